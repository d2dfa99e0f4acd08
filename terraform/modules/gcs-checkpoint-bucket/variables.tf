variable "project_id" {
  type        = string
  description = "ID of the Google Cloud project that owns the bucket."

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.project_id))
    error_message = "project_id must be a Google Cloud project ID: 6-30 characters, lowercase letters, digits and hyphens, starting with a letter."
  }
}

variable "name" {
  type        = string
  description = "Globally unique bucket name (no gs:// prefix)."

  validation {
    condition = alltrue([
      can(regex("^[a-z0-9][a-z0-9_-]{1,61}[a-z0-9]$", var.name)),
      !startswith(var.name, "goog"),
      !strcontains(var.name, "google"),
    ])
    error_message = "name must be 3-63 characters of lowercase letters, digits, '-' and '_', start and end with a letter or digit, and not start with 'goog' or contain 'google'."
  }
}

variable "location" {
  type        = string
  description = <<-EOT
    Bucket location. Use the region the TPUs/GPUs run in (for example
    "us-central2" for TPU v4, "us-east5" or "europe-west4"): a bucket in
    another region is billed for inter-region egress on every save and
    restore, and is slower. Dual- and multi-regions ("US", "NAM4") are
    accepted but are rarely the right choice for checkpoints.
  EOT

  validation {
    condition = can(regex("^([a-z]+-[a-z]+[0-9]+|[A-Za-z]{2,4}[0-9]?)$", var.location))
    error_message = "location must be a GCS region such as \"us-central1\", or a dual-/multi-region code such as \"US\" or \"NAM4\"."
  }
}

variable "storage_class" {
  type        = string
  description = "Default storage class. STANDARD suits checkpoints, which are written and read often and deleted after days, not months."
  default     = "STANDARD"
  nullable    = false

  validation {
    condition     = contains(["STANDARD", "NEARLINE", "COLDLINE", "ARCHIVE"], var.storage_class)
    error_message = "storage_class must be one of STANDARD, NEARLINE, COLDLINE or ARCHIVE."
  }
}

variable "training_service_account" {
  type        = string
  description = "Email of the service account the training job runs as; it gets read/write/list/delete on objects in this bucket and nothing else."

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]*@[a-z0-9][a-z0-9.-]*\\.gserviceaccount\\.com$", var.training_service_account))
    error_message = "training_service_account must be a service account email ending in .gserviceaccount.com."
  }
}

variable "checkpoint_prefix" {
  type        = string
  description = "Object prefix under which the training job writes checkpoints; used to build the checkpoint URL outputs. Must end with '/'."
  default     = "checkpoints/"
  nullable    = false

  validation {
    condition     = can(regex("^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*/$", var.checkpoint_prefix))
    error_message = "checkpoint_prefix must be a relative path of letters, digits, '.', '_' and '-' segments, without a leading '/', and ending with '/'."
  }
}

variable "soft_delete_retention_days" {
  type        = number
  description = <<-EOT
    Days GCS keeps deleted objects recoverable (and billed). GCS turns soft
    delete on for 7 days by default, which for a checkpoint bucket means every
    checkpoint removed by retention is paid for another week. 0 turns it off;
    otherwise GCS accepts 7 to 90.
  EOT
  default     = 0
  nullable    = false

  validation {
    condition = anytrue([
      var.soft_delete_retention_days == 0,
      var.soft_delete_retention_days >= 7 && var.soft_delete_retention_days <= 90,
    ])
    error_message = "soft_delete_retention_days must be 0 (off) or between 7 and 90."
  }

  validation {
    condition     = floor(var.soft_delete_retention_days) == var.soft_delete_retention_days
    error_message = "soft_delete_retention_days must be a whole number of days."
  }
}

variable "hierarchical_namespace" {
  type        = bool
  description = "Create the bucket with hierarchical namespace (real folders, atomic folder rename). Can only be chosen at creation time."
  default     = false
  nullable    = false
}

variable "expire_after_days" {
  type        = number
  description = "If set, objects under expire_prefix are deleted this many days after creation. Null (the default) adds no age-based deletion."
  default     = null

  validation {
    condition     = var.expire_after_days == null || try(var.expire_after_days >= 1 && floor(var.expire_after_days) == var.expire_after_days, false)
    error_message = "expire_after_days must be null or a whole number of days >= 1."
  }
}

variable "expire_prefix" {
  type        = string
  description = <<-EOT
    Prefix the age-based deletion applies to. Point it at throwaway runs
    (for example "scratch/"), not at the live checkpoint prefix: lifecycle
    deletion removes objects one by one, days after they were written, with
    no regard for which step they belong to or whether it is the latest.
  EOT
  default     = "scratch/"
  nullable    = false

  validation {
    condition     = can(regex("^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*/$", var.expire_prefix))
    error_message = "expire_prefix must be a relative path of letters, digits, '.', '_' and '-' segments, without a leading '/', and ending with '/'."
  }
}

variable "kms_key_name" {
  type        = string
  description = "Optional Cloud KMS key (projects/P/locations/L/keyRings/R/cryptoKeys/K) used as the bucket's default encryption key. Null uses Google-managed encryption. The key must be in the bucket's location."
  default     = null

  validation {
    condition     = var.kms_key_name == null || can(regex("^projects/[^/]+/locations/[^/]+/keyRings/[^/]+/cryptoKeys/[^/]+$", var.kms_key_name))
    error_message = "kms_key_name must be null or a full key name: projects/P/locations/L/keyRings/R/cryptoKeys/K."
  }
}

variable "labels" {
  type        = map(string)
  description = "Labels to put on the bucket (cost attribution, team, run)."
  default     = {}
  nullable    = false

  validation {
    condition     = alltrue([for k, v in var.labels : can(regex("^[a-z][a-z0-9_-]{0,62}$", k)) && can(regex("^[a-z0-9_-]{0,63}$", v))])
    error_message = "label keys must start with a lowercase letter; keys and values may use lowercase letters, digits, '_' and '-' (at most 63 characters)."
  }
}

variable "force_destroy" {
  type        = bool
  description = "Allow `terraform destroy` to delete the bucket while it still holds checkpoints."
  default     = false
  nullable    = false
}
