output "bucket_name" {
  description = "Name of the checkpoint bucket."
  value       = google_storage_bucket.this.name
}

output "bucket_url" {
  description = "gs:// URL of the bucket."
  value       = "gs://${google_storage_bucket.this.name}"
}

output "checkpoint_url" {
  description = "gs:// URL of the checkpoint prefix; pass it (plus a run name) to cloudckpt, e.g. cc.CheckpointManager(f\"{url}/my-run\")."
  value       = "gs://${google_storage_bucket.this.name}/${trimsuffix(var.checkpoint_prefix, "/")}"
}

output "location" {
  description = "Location of the bucket; run the training job in the same region."
  value       = google_storage_bucket.this.location
}

output "environment" {
  description = "Environment for the training job. cloudckpt needs no GCS-specific variables (it uses Application Default Credentials); CHECKPOINT_URL is for the training script to read and hand to cloudckpt."
  value = {
    CHECKPOINT_URL       = "gs://${google_storage_bucket.this.name}/${trimsuffix(var.checkpoint_prefix, "/")}"
    GOOGLE_CLOUD_PROJECT = var.project_id
  }
}
