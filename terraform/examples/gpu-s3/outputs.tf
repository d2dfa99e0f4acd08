output "checkpoint_url" {
  description = "URL to give cloudckpt (append a run name)."
  value       = module.checkpoints.checkpoint_url
}

output "environment" {
  description = "Environment variables to set on the GPU hosts."
  value       = module.checkpoints.environment
}

output "policy_arn" {
  description = "IAM policy attached to the training role."
  value       = module.checkpoints.policy_arn
}
