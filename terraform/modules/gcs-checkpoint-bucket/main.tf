locals {
  # GCS takes the soft delete window in seconds; 0 disables it.
  soft_delete_retention_seconds = var.soft_delete_retention_days * 24 * 60 * 60
  use_cmek                      = var.kms_key_name != null
}

# With CMEK the bucket is encrypted by the Cloud Storage service agent, not by
# the caller, so that agent needs to use the key before the bucket can be
# created with it.
data "google_storage_project_service_account" "gcs" {
  count   = local.use_cmek ? 1 : 0
  project = var.project_id
}

resource "google_kms_crypto_key_iam_member" "gcs_uses_key" {
  count         = local.use_cmek ? 1 : 0
  crypto_key_id = var.kms_key_name
  role          = "roles/cloudkms.cryptoKeyEncrypterDecrypter"
  member        = "serviceAccount:${data.google_storage_project_service_account.gcs[0].email_address}"
}

resource "google_storage_bucket" "this" {
  # checkov:skip=CKV_GCP_78:Versioning is off on purpose: checkpoints are written once per step and deleted by retention, and noncurrent versions would keep every deleted step billed. Accidental deletes are covered by soft_delete_retention_days when a team wants that.
  # checkov:skip=CKV_GCP_62:Usage/storage logs to another bucket are not needed for checkpoints; object access is audited through Cloud Audit Logs (Data Access logs for storage.googleapis.com), enabled at project or org level.
  project       = var.project_id
  name          = var.name
  location      = var.location
  storage_class = var.storage_class
  labels        = var.labels
  force_destroy = var.force_destroy

  # IAM only, no per-object ACLs; required by hierarchical namespace too.
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"

  # Deleted checkpoints are not kept (or billed) unless the caller asks for a
  # recovery window.
  soft_delete_policy {
    retention_duration_seconds = local.soft_delete_retention_seconds
  }

  versioning {
    enabled = false
  }

  # Chosen at creation only; changing it replaces the bucket.
  hierarchical_namespace {
    enabled = var.hierarchical_namespace
  }

  # Parts of an interrupted multipart (XML API) upload are billed until they
  # are aborted. A checkpoint upload never legitimately takes a day.
  lifecycle_rule {
    action {
      type = "AbortIncompleteMultipartUpload"
    }
    condition {
      age = 1
    }
  }

  dynamic "lifecycle_rule" {
    for_each = var.expire_after_days == null ? [] : [var.expire_after_days]
    content {
      action {
        type = "Delete"
      }
      condition {
        age            = lifecycle_rule.value
        matches_prefix = [var.expire_prefix]
      }
    }
  }

  dynamic "encryption" {
    for_each = local.use_cmek ? [var.kms_key_name] : []
    content {
      default_kms_key_name = encryption.value
    }
  }

  depends_on = [google_kms_crypto_key_iam_member.gcs_uses_key]
}

# roles/storage.objectUser is the smallest predefined role that covers what
# cloudckpt does: storage.objects.create (save, create-only commit markers),
# get (restore), list (find steps) and delete (retention, gc), plus the
# storage.multipartUploads.* permissions used by large parallel uploads.
# objectCreator + objectViewer would lack delete; objectAdmin adds object IAM
# management; storage.admin adds bucket administration. The binding is on
# this bucket only, so the training identity gets nothing on other buckets
# and no bucket-level permissions (it cannot change lifecycle, IAM or delete
# the bucket).
resource "google_storage_bucket_iam_member" "training" {
  bucket = google_storage_bucket.this.name
  role   = "roles/storage.objectUser"
  member = "serviceAccount:${var.training_service_account}"
}
