output "checkpoint_url" {
  description = "URL to give cloudckpt (append a run name)."
  value       = module.checkpoints.checkpoint_url
}

output "environment" {
  description = "Environment variables to set on the TPU VMs."
  value       = module.checkpoints.environment
}
