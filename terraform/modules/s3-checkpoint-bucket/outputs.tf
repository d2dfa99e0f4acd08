output "bucket_name" {
  description = "Name of the checkpoint bucket."
  value       = aws_s3_bucket.this.id
}

output "bucket_arn" {
  description = "ARN of the checkpoint bucket."
  value       = aws_s3_bucket.this.arn
}

output "bucket_url" {
  description = "s3:// URL of the bucket."
  value       = "s3://${aws_s3_bucket.this.id}"
}

output "checkpoint_url" {
  description = "s3:// URL of the checkpoint prefix the policy grants; pass it (plus a run name) to cloudckpt, e.g. cc.CheckpointManager(f\"{url}/my-run\")."
  value       = "s3://${aws_s3_bucket.this.id}/${trimsuffix(var.checkpoint_prefix, "/")}"
}

output "region" {
  description = "Region of the bucket; run the training job in the same region and export it as AWS_REGION."
  value       = aws_s3_bucket.this.region
}

output "policy_arn" {
  description = "ARN of the IAM policy granting the training job access to the checkpoint prefix; attach it to the job's role if training_role_name was not set."
  value       = aws_iam_policy.training.arn
}

output "environment" {
  description = "Environment for the training job: AWS_REGION is read by cloudckpt's S3 client; CHECKPOINT_URL is for the training script to read and hand to cloudckpt. Credentials come from the role."
  value = {
    AWS_REGION     = aws_s3_bucket.this.region
    CHECKPOINT_URL = "s3://${aws_s3_bucket.this.id}/${trimsuffix(var.checkpoint_prefix, "/")}"
  }
}
