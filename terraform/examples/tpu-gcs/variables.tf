variable "project_id" {
  type        = string
  description = "Google Cloud project that runs the TPUs and owns the bucket."
}

variable "region" {
  type        = string
  description = "Region of the TPU VMs; the bucket is created in the same region."
  default     = "us-central2"
  nullable    = false
}

variable "bucket_name" {
  type        = string
  description = "Globally unique name for the checkpoint bucket."
}

variable "training_service_account" {
  type        = string
  description = "Service account email the TPU VMs run as."
}
