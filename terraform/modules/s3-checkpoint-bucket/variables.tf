variable "bucket_name" {
  type        = string
  description = "Globally unique bucket name (no s3:// prefix). Create it in the region the GPUs run in: the provider's region decides where the bucket lives."

  validation {
    condition = alltrue([
      can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.bucket_name)),
      !strcontains(var.bucket_name, ".."),
      !can(regex("^[0-9]+\\.[0-9]+\\.[0-9]+\\.[0-9]+$", var.bucket_name)),
    ])
    error_message = "bucket_name must be 3-63 characters of lowercase letters, digits, '.' and '-', start and end with a letter or digit, and not look like an IP address."
  }
}

variable "checkpoint_prefix" {
  type        = string
  description = "Key prefix the training job may use; the IAM policy grants access to this prefix only. Must end with '/'."
  default     = "checkpoints/"
  nullable    = false

  validation {
    condition     = can(regex("^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*/$", var.checkpoint_prefix))
    error_message = "checkpoint_prefix must be a relative path of letters, digits, '.', '_' and '-' segments, without a leading '/', and ending with '/'."
  }
}

variable "kms_key_arn" {
  type        = string
  description = "Optional KMS key ARN for SSE-KMS (with an S3 Bucket Key to keep KMS request costs down). Null keeps S3-managed encryption (SSE-S3, AES256). The training role also needs kms:GenerateDataKey and kms:Decrypt on this key."
  default     = null

  validation {
    condition     = var.kms_key_arn == null || can(regex("^arn:aws[a-zA-Z-]*:kms:[a-z0-9-]+:[0-9]{12}:(key|alias)/.+$", var.kms_key_arn))
    error_message = "kms_key_arn must be null or a KMS key or alias ARN."
  }
}

variable "versioning_enabled" {
  type        = bool
  description = "Turn on versioning. Off by default: checkpoints are written once and removed by retention, and versioning would keep every removed step billed as a noncurrent version."
  default     = false
  nullable    = false
}

variable "noncurrent_version_expiration_days" {
  type        = number
  description = "When versioning is on, days after which noncurrent (deleted or overwritten) versions are removed: the S3 counterpart of a GCS soft-delete window."
  default     = 7
  nullable    = false

  validation {
    condition     = var.noncurrent_version_expiration_days >= 1 && floor(var.noncurrent_version_expiration_days) == var.noncurrent_version_expiration_days
    error_message = "noncurrent_version_expiration_days must be a whole number of days >= 1."
  }
}

variable "expire_after_days" {
  type        = number
  description = "If set, objects under expire_prefix expire this many days after creation. Null (the default) adds no expiry."
  default     = null

  validation {
    condition     = var.expire_after_days == null || try(var.expire_after_days >= 1 && floor(var.expire_after_days) == var.expire_after_days, false)
    error_message = "expire_after_days must be null or a whole number of days >= 1."
  }
}

variable "expire_prefix" {
  type        = string
  description = <<-EOT
    Prefix the expiry applies to. Point it at throwaway runs (for example
    "scratch/"), not at the live checkpoint prefix: lifecycle expiry removes
    objects one by one, days after they were written, with no regard for
    which step they belong to or whether it is the latest.
  EOT
  default     = "scratch/"
  nullable    = false

  validation {
    condition     = can(regex("^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*/$", var.expire_prefix))
    error_message = "expire_prefix must be a relative path of letters, digits, '.', '_' and '-' segments, without a leading '/', and ending with '/'."
  }
}

variable "training_role_name" {
  type        = string
  description = "Optional name of the IAM role the training job runs as (e.g. the EC2 instance profile or EKS IRSA role). When set, the checkpoint policy is attached to it."
  default     = null

  validation {
    condition     = var.training_role_name == null || can(regex("^[A-Za-z0-9+=,.@_-]{1,64}$", var.training_role_name))
    error_message = "training_role_name must be null or an IAM role name (not an ARN)."
  }
}

variable "tags" {
  type        = map(string)
  description = "Tags to put on the bucket and the IAM policy."
  default     = {}
  nullable    = false
}

variable "force_destroy" {
  type        = bool
  description = "Allow `terraform destroy` to delete the bucket while it still holds checkpoints."
  default     = false
  nullable    = false
}
