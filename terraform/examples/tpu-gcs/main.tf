provider "google" {
  project = var.project_id
  region  = var.region
}

module "checkpoints" {
  source = "../../modules/gcs-checkpoint-bucket"

  project_id               = var.project_id
  name                     = var.bucket_name
  location                 = var.region
  training_service_account = var.training_service_account
  labels                   = { team = "ml", purpose = "checkpoints" }
}
