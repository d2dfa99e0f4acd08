terraform {
  required_version = ">= 1.5.0, < 2.0.0"

  required_providers {
    # 6.x is the first major line with hierarchical_namespace and
    # soft_delete_policy both generally available on google_storage_bucket.
    google = {
      source  = "hashicorp/google"
      version = ">= 6.0.0, < 8.0.0"
    }
  }
}
