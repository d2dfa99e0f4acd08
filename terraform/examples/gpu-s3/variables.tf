variable "region" {
  type        = string
  description = "Region of the GPU instances; the bucket is created in the same region."
  default     = "us-east-1"
  nullable    = false

  validation {
    condition     = can(regex("^[a-z]{2}(-gov|-iso[a-z]*)?-[a-z]+-[0-9]+$", var.region))
    error_message = "region must be an AWS region code such as \"us-east-1\"."
  }
}

variable "bucket_name" {
  type        = string
  description = "Globally unique name for the checkpoint bucket."
}

variable "training_role_name" {
  type        = string
  description = "Name of the IAM role the GPU instances (instance profile) or pods (IRSA) assume."
}
