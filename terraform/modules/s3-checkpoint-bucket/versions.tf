terraform {
  required_version = ">= 1.5.0, < 2.0.0"

  required_providers {
    # 5.x split bucket settings into the separate aws_s3_bucket_* resources
    # used here; 6.x keeps them.
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0.0, < 7.0.0"
    }
  }
}
