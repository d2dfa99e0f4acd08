provider "aws" {
  region = var.region
}

module "checkpoints" {
  source = "../../modules/s3-checkpoint-bucket"

  bucket_name        = var.bucket_name
  training_role_name = var.training_role_name
  tags               = { team = "ml", purpose = "checkpoints" }
}
