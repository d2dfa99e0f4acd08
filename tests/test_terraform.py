"""Static checks of the Terraform under terraform/.

There is no terraform binary or provider download in CI, so the modules are
checked by parsing every .tf file with python-hcl2 and asserting the settings
a checkpoint bucket needs on the parsed resources, and by running checkov
(from its own virtualenv, see CHECKOV_BIN) over the whole tree.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hcl2
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TF_ROOT = REPO_ROOT / "terraform"
GCS_MODULE = TF_ROOT / "modules" / "gcs-checkpoint-bucket"
S3_MODULE = TF_ROOT / "modules" / "s3-checkpoint-bucket"
TPU_EXAMPLE = TF_ROOT / "examples" / "tpu-gcs"
GPU_EXAMPLE = TF_ROOT / "examples" / "gpu-s3"
ROOTS = (GCS_MODULE, S3_MODULE, TPU_EXAMPLE, GPU_EXAMPLE)

TF_FILES = sorted(TF_ROOT.rglob("*.tf"))

# What cloudckpt does on S3, and nothing more.
S3_ALLOWED_ACTIONS = {
    "s3:PutObject",
    "s3:GetObject",
    "s3:DeleteObject",
    "s3:AbortMultipartUpload",
    "s3:ListBucket",
}
# Smallest predefined GCS role with objects.create/get/list/delete.
GCS_TRAINING_ROLE = "roles/storage.objectUser"
# Roles that would give the training identity more than object access.
GCS_FORBIDDEN_ROLES = {
    "roles/storage.admin",
    "roles/storage.objectAdmin",
    "roles/storage.legacyBucketOwner",
    "roles/owner",
    "roles/editor",
}

# Every checkov check the modules opt out of. Each one carries its reason in a
# `# checkov:skip=` comment on the resource; a new skip has to be added here
# on purpose.
EXPECTED_CHECKOV_SKIPS = {
    "CKV_GCP_62",  # bucket access logs: Cloud Audit Logs instead
    "CKV_GCP_78",  # versioning: off on purpose, soft delete is the knob
    "CKV_AWS_18",  # server access logs: CloudTrail data events instead
    "CKV_AWS_21",  # versioning: off by default on purpose
    "CKV_AWS_144",  # cross-region replication: data must stay by the GPUs
    "CKV_AWS_145",  # KMS by default: SSE-S3 default, KMS optional
    "CKV2_AWS_62",  # event notifications: nothing consumes them
}

_HCL_OPTIONS = hcl2.SerializationOptions(
    strip_string_quotes=True, explicit_blocks=False, with_comments=False
)
_HCL_OPTIONS_WITH_COMMENTS = hcl2.SerializationOptions(
    strip_string_quotes=True, explicit_blocks=False, with_comments=True
)


# --------------------------------------------------------------------------
# Parsing helpers
# --------------------------------------------------------------------------


@functools.cache
def parse_file(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        return hcl2.load(f, serialization_options=_HCL_OPTIONS)


def parse_with_comments(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        return hcl2.load(f, serialization_options=_HCL_OPTIONS_WITH_COMMENTS)


@functools.cache
def parse_dir(directory: Path) -> dict[str, list[Any]]:
    """All top-level blocks of a module, merged across its .tf files."""
    merged: dict[str, list[Any]] = {}
    files = sorted(directory.glob("*.tf"))
    assert files, f"no .tf files in {directory}"
    for path in files:
        for key, blocks in parse_file(path).items():
            merged.setdefault(key, []).extend(blocks)
    return merged


def labelled(config: dict[str, list[Any]], kind: str) -> dict[str, dict[str, Any]]:
    """Single-label blocks (variable, output, module) by name."""
    out: dict[str, dict[str, Any]] = {}
    for entry in config.get(kind, []):
        for name, body in entry.items():
            assert name not in out, f"duplicate {kind} {name}"
            out[name] = body
    return out


def typed(config: dict[str, list[Any]], kind: str, type_: str) -> dict[str, dict[str, Any]]:
    """Two-label blocks (resource, data) of one type, by name."""
    out: dict[str, dict[str, Any]] = {}
    for entry in config.get(kind, []):
        for name, body in entry.get(type_, {}).items():
            out[name] = body
    return out


def all_typed(config: dict[str, list[Any]], kind: str) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for entry in config.get(kind, []):
        for type_, named in entry.items():
            for name, body in named.items():
                yield type_, name, body


def one(body: dict[str, Any], block: str) -> dict[str, Any]:
    blocks = body.get(block, [])
    assert len(blocks) == 1, f"expected exactly one {block!r} block, found {len(blocks)}"
    return blocks[0]


def dynamic(body: dict[str, Any], block: str) -> list[dict[str, Any]]:
    return [entry[block] for entry in body.get("dynamic", []) if block in entry]


def unwrap(value: str) -> str:
    """'${expr}' -> 'expr' for a whole-value interpolation."""
    assert isinstance(value, str) and value.startswith("${") and value.endswith("}"), value
    return value[2:-1]


def variables(directory: Path) -> dict[str, dict[str, Any]]:
    return labelled(parse_dir(directory), "variable")


def locals_of(directory: Path) -> dict[str, Any]:
    return {k: v for block in parse_dir(directory).get("locals", []) for k, v in block.items()}


def validation_conditions(directory: Path, name: str) -> str:
    return " ".join(v["condition"] for v in variables(directory)[name].get("validation", []))


def default(directory: Path, name: str) -> Any:
    var = variables(directory)[name]
    assert "default" in var, f"variable {name} in {directory.name} has no default"
    return var["default"]


def resolve(expr: str, directory: Path, **values: Any) -> Any:
    """Evaluate the simple expressions the modules use for their defaults.

    Supports `var.x`, `local.x`, `var.x == null ? "a" : "b"`, `var.x ? "a" : "b"`
    and integer arithmetic over `var.x` with `*`/`+`, with every variable at
    its default unless given in `values`. Anything else fails the test rather
    than being guessed at.
    """

    def var(name: str) -> Any:
        return values[name] if name in values else default(directory, name)

    expr = expr.strip()
    if expr.startswith("${") and expr.endswith("}"):
        expr = unwrap(expr)
    if m := re.fullmatch(r"local\.(\w+)", expr):
        return resolve(locals_of(directory)[m[1]], directory, **values)
    if m := re.fullmatch(r"var\.(\w+)", expr):
        return var(m[1])
    if m := re.fullmatch(r'var\.(\w+)( == null)? \? "([^"]*)" : "([^"]*)"', expr):
        value = var(m[1])
        condition = value is None if m[2] else value
        assert isinstance(condition, bool), expr
        return m[3] if condition else m[4]
    arithmetic = re.sub(r"var\.(\w+)", lambda v: repr(var(v[1])), expr)
    if re.fullmatch(r"[0-9 *+()]+", arithmetic):
        return eval(arithmetic, {"__builtins__": {}})  # digits and operators only
    raise AssertionError(f"cannot resolve expression {expr!r}")


def validation_regex(directory: Path, name: str) -> re.Pattern[str]:
    """The regex a variable's validation applies to the variable itself."""
    conditions = [v["condition"] for v in variables(directory)[name].get("validation", [])]
    for condition in conditions:
        if m := re.search(rf'regex\("((?:[^"\\]|\\.)*)", var\.{name}\)', condition):
            # HCL string escapes -> the regex text Terraform sees.
            return re.compile(json.loads(f'"{m[1]}"'))
    raise AssertionError(f"no regex validation on variable {name} in {directory.name}")


# --------------------------------------------------------------------------
# The whole tree
# --------------------------------------------------------------------------


@pytest.mark.parametrize("root", ROOTS, ids=lambda p: p.name)
def test_every_module_and_example_has_the_standard_files(root: Path) -> None:
    for name in ("main.tf", "variables.tf", "outputs.tf", "versions.tf"):
        assert (root / name).is_file(), f"{root.name}/{name} is missing"


@pytest.mark.parametrize("path", TF_FILES, ids=lambda p: str(p.relative_to(TF_ROOT)))
def test_every_tf_file_parses(path: Path) -> None:
    assert parse_file(path), f"{path} parsed to nothing"


@pytest.mark.parametrize("root", ROOTS, ids=lambda p: p.name)
def test_every_variable_has_type_and_description(root: Path) -> None:
    vars_ = variables(root)
    assert vars_
    for name, var in vars_.items():
        assert var.get("type"), f"{root.name}: variable {name} has no type"
        description = var.get("description", "")
        assert isinstance(description, str) and len(description.strip()) >= 10, (
            f"{root.name}: variable {name} has no real description"
        )


@pytest.mark.parametrize("root", ROOTS, ids=lambda p: p.name)
def test_every_output_has_description(root: Path) -> None:
    outputs = labelled(parse_dir(root), "output")
    assert outputs
    for name, out in outputs.items():
        assert out.get("description"), f"{root.name}: output {name} has no description"


CONSTRAINED_VARIABLES = {
    GCS_MODULE: [
        "project_id",
        "name",
        "location",
        "storage_class",
        "training_service_account",
        "checkpoint_prefix",
        "soft_delete_retention_days",
        "expire_after_days",
        "expire_prefix",
        "kms_key_name",
        "labels",
    ],
    S3_MODULE: [
        "bucket_name",
        "checkpoint_prefix",
        "kms_key_arn",
        "noncurrent_version_expiration_days",
        "expire_after_days",
        "expire_prefix",
        "training_role_name",
    ],
    GPU_EXAMPLE: ["region"],
}


@pytest.mark.parametrize(
    ("root", "name"),
    [(root, name) for root, names in CONSTRAINED_VARIABLES.items() for name in names],
    ids=lambda x: x.name if isinstance(x, Path) else x,
)
def test_constrained_variables_have_validation(root: Path, name: str) -> None:
    validations = variables(root)[name].get("validation", [])
    assert validations, f"{root.name}: variable {name} has no validation"
    for v in validations:
        assert f"var.{name}" in v["condition"], v
        assert v["error_message"].strip(), v


@pytest.mark.parametrize("root", ROOTS, ids=lambda p: p.name)
def test_versions_pin_terraform_and_providers(root: Path) -> None:
    config = parse_file(root / "versions.tf")
    terraform = one(config, "terraform")
    required_version = terraform.get("required_version", "")
    assert ">=" in required_version and "<" in required_version, required_version

    providers = one(terraform, "required_providers")
    assert providers
    for name, spec in providers.items():
        assert spec["source"] == f"hashicorp/{name}", spec
        constraint = spec["version"]
        assert re.search(r">=\s*\d", constraint) and re.search(r"<\s*\d", constraint), (
            f"{root.name}: provider {name} must be pinned to a range, got {constraint!r}"
        )

    # Every provider a resource or data source uses is declared and pinned.
    config_all = parse_dir(root)
    used = {
        type_.split("_")[0]
        for kind in ("resource", "data")
        for type_, _, _ in all_typed(config_all, kind)
    }
    used |= {name for entry in config_all.get("provider", []) for name in entry}
    assert used <= set(providers), f"{root.name}: unpinned providers {used - set(providers)}"


def test_both_clouds_pin_the_same_provider_ranges() -> None:
    def pinned(root: Path) -> dict[str, str]:
        providers = one(one(parse_file(root / "versions.tf"), "terraform"), "required_providers")
        return {name: spec["version"] for name, spec in providers.items()}

    assert pinned(GCS_MODULE) == pinned(TPU_EXAMPLE)
    assert pinned(S3_MODULE) == pinned(GPU_EXAMPLE)


def test_checkov_skips_are_on_resources_with_reasons() -> None:
    skip = re.compile(r"checkov:skip=(CKV2?_[A-Z]+_\d+)(?::(.*))?")
    found: set[str] = set()
    for path in TF_FILES:
        text_skips = skip.findall(path.read_text(encoding="utf-8"))
        attached: list[str] = []
        for kind in ("resource", "data"):
            for _, _, body in all_typed(parse_with_comments(path), kind):
                attached += [c["value"] for c in body.get("__comments__", [])]
        attached_ids = {m[1] for c in attached if (m := skip.search(c))}
        for check_id, reason in text_skips:
            assert check_id in attached_ids, f"{path}: skip of {check_id} is not inside a resource"
            assert len(reason.strip()) >= 40, f"{path}: skip of {check_id} needs a real reason"
            found.add(check_id)
    assert found == EXPECTED_CHECKOV_SKIPS


# --------------------------------------------------------------------------
# GCS module
# --------------------------------------------------------------------------


@functools.cache
def gcs_bucket() -> dict[str, Any]:
    buckets = typed(parse_dir(GCS_MODULE), "resource", "google_storage_bucket")
    assert list(buckets) == ["this"]
    return buckets["this"]


def test_gcs_bucket_is_in_the_given_location() -> None:
    bucket = gcs_bucket()
    assert bucket["location"] == "${var.location}"
    assert bucket["project"] == "${var.project_id}"
    assert default(GCS_MODULE, "storage_class") == "STANDARD"


@pytest.mark.parametrize(
    ("location", "ok"),
    [
        ("us-central2", True),
        ("europe-west4", True),
        ("US", True),
        ("NAM4", True),
        ("", False),
        ("us central1", False),
        ("gs://bucket", False),
        ("us-central", False),
    ],
)
def test_gcs_location_validation(location: str, ok: bool) -> None:
    assert bool(validation_regex(GCS_MODULE, "location").fullmatch(location)) is ok


@pytest.mark.parametrize(
    ("name", "value", "ok"),
    [
        ("training_service_account", "trainer@my-project.iam.gserviceaccount.com", True),
        ("training_service_account", "123456789-compute@developer.gserviceaccount.com", True),
        ("training_service_account", "someone@example.com", False),
        ("training_service_account", "serviceAccount:t@p.iam.gserviceaccount.com", False),
        ("kms_key_name", "projects/p/locations/us-central2/keyRings/r/cryptoKeys/k", True),
        ("kms_key_name", "projects/p/locations/us-central2/keyRings/r", False),
        ("project_id", "my-project-123", True),
        ("project_id", "My_Project", False),
    ],
)
def test_gcs_identifier_validation(name: str, value: str, ok: bool) -> None:
    assert bool(validation_regex(GCS_MODULE, name).fullmatch(value)) is ok


def test_gcs_access_is_uniform_and_never_public() -> None:
    bucket = gcs_bucket()
    assert bucket["uniform_bucket_level_access"] is True
    assert bucket["public_access_prevention"] == "enforced"
    config = parse_dir(GCS_MODULE)
    for type_, name, body in all_typed(config, "resource"):
        if "iam" in type_:
            assert "allUsers" not in str(body.get("member", "")), name
            assert "allAuthenticatedUsers" not in str(body.get("member", "")), name
        # ACL resources would bypass uniform bucket-level access.
        assert "acl" not in type_, type_


def test_gcs_soft_delete_is_off_by_default() -> None:
    policy = one(gcs_bucket(), "soft_delete_policy")
    seconds = policy["retention_duration_seconds"]
    assert default(GCS_MODULE, "soft_delete_retention_days") == 0
    assert resolve(seconds, GCS_MODULE) == 0
    # And the variable really drives it.
    assert resolve(seconds, GCS_MODULE, soft_delete_retention_days=7) == 7 * 24 * 3600


def test_gcs_soft_delete_validation_allows_only_gcs_values() -> None:
    conditions = validation_conditions(GCS_MODULE, "soft_delete_retention_days")
    assert "== 0" in conditions and ">= 7" in conditions and "<= 90" in conditions


def test_gcs_versioning_is_off() -> None:
    assert one(gcs_bucket(), "versioning")["enabled"] is False


def test_gcs_hierarchical_namespace_is_optional_and_off_by_default() -> None:
    hns = one(gcs_bucket(), "hierarchical_namespace")
    assert resolve(hns["enabled"], GCS_MODULE) is False
    assert resolve(hns["enabled"], GCS_MODULE, hierarchical_namespace=True) is True


def test_gcs_aborts_incomplete_multipart_uploads_after_one_day() -> None:
    rules = gcs_bucket().get("lifecycle_rule", [])
    abort = [r for r in rules if one(r, "action")["type"] == "AbortIncompleteMultipartUpload"]
    assert len(abort) == 1, rules
    condition = one(abort[0], "condition")
    assert condition == {"age": 1}, "the abort rule must apply to the whole bucket after 1 day"


def test_gcs_age_based_deletion_is_optional_and_prefix_scoped() -> None:
    (rule,) = dynamic(gcs_bucket(), "lifecycle_rule")
    assert unwrap(rule["for_each"]).startswith("var.expire_after_days == null ? []")
    content = one(rule, "content")
    assert one(content, "action")["type"] == "Delete"
    condition = one(content, "condition")
    assert condition["matches_prefix"] == ["${var.expire_prefix}"]
    assert condition["age"] == "${lifecycle_rule.value}"
    assert default(GCS_MODULE, "expire_after_days") is None
    # Never the live checkpoint prefix by default.
    assert default(GCS_MODULE, "expire_prefix") != default(GCS_MODULE, "checkpoint_prefix")
    assert ">= 1" in validation_conditions(GCS_MODULE, "expire_after_days")


@pytest.mark.parametrize("root", [GCS_MODULE, S3_MODULE], ids=lambda p: p.name)
@pytest.mark.parametrize(
    ("prefix", "ok"),
    [
        ("checkpoints/", True),
        ("team-a/run_1.v2/", True),
        ("checkpoints", False),
        ("/checkpoints/", False),
        ("a//b/", False),
        ("", False),
        ("*/", False),
    ],
)
def test_prefix_validation(root: Path, prefix: str, ok: bool) -> None:
    for name in ("checkpoint_prefix", "expire_prefix"):
        assert bool(validation_regex(root, name).fullmatch(prefix)) is ok, name


def test_gcs_cmek_is_optional() -> None:
    (encryption,) = dynamic(gcs_bucket(), "encryption")
    assert "local.use_cmek" in encryption["for_each"]
    assert one(encryption, "content")["default_kms_key_name"] == "${encryption.value}"
    assert default(GCS_MODULE, "kms_key_name") is None
    assert unwrap(locals_of(GCS_MODULE)["use_cmek"]) == "var.kms_key_name != null"
    # The Cloud Storage service agent must be able to use the key.
    grants = typed(parse_dir(GCS_MODULE), "resource", "google_kms_crypto_key_iam_member")
    (grant,) = grants.values()
    assert grant["role"] == "roles/cloudkms.cryptoKeyEncrypterDecrypter"
    assert "google_storage_project_service_account" in grant["member"]
    assert "local.use_cmek" in grant["count"]


def test_gcs_training_account_gets_the_least_role_on_this_bucket_only() -> None:
    config = parse_dir(GCS_MODULE)
    members = typed(config, "resource", "google_storage_bucket_iam_member")
    (member,) = members.values()
    assert member["role"] == GCS_TRAINING_ROLE
    assert member["bucket"] == "${google_storage_bucket.this.name}"
    assert member["member"] == "serviceAccount:${var.training_service_account}"
    # Authoritative bindings/policies would wipe other principals' access.
    for type_, _, _ in all_typed(config, "resource"):
        assert not re.fullmatch(r"google_.*_iam_(binding|policy)", type_), type_


def test_no_broad_gcs_role_anywhere() -> None:
    for path in TF_FILES:
        text = path.read_text(encoding="utf-8")
        for role in GCS_FORBIDDEN_ROLES:
            assert f'"{role}"' not in text, f"{path} grants {role}"
        for type_, name, body in all_typed(parse_file(path), "resource"):
            if type_.startswith("google_") and "role" in body:
                assert body["role"] not in GCS_FORBIDDEN_ROLES, (path, name)


def test_gcs_labels_and_outputs() -> None:
    assert gcs_bucket()["labels"] == "${var.labels}"
    outputs = labelled(parse_dir(GCS_MODULE), "output")
    assert outputs["bucket_url"]["value"] == "gs://${google_storage_bucket.this.name}"
    assert outputs["checkpoint_url"]["value"].startswith("gs://${google_storage_bucket.this.name}/")
    environment = outputs["environment"]["value"]
    assert environment["CHECKPOINT_URL"] == outputs["checkpoint_url"]["value"]
    assert environment["GOOGLE_CLOUD_PROJECT"] == "${var.project_id}"


# --------------------------------------------------------------------------
# S3 module
# --------------------------------------------------------------------------


def s3_resource(type_: str) -> dict[str, Any]:
    resources = typed(parse_dir(S3_MODULE), "resource", type_)
    assert len(resources) == 1, f"expected one {type_}, found {list(resources)}"
    (body,) = resources.values()
    return body


def policy_document(name: str) -> list[dict[str, Any]]:
    docs = typed(parse_dir(S3_MODULE), "data", "aws_iam_policy_document")
    return docs[name]["statement"]


def test_s3_bucket_settings_all_target_the_bucket() -> None:
    for type_ in (
        "aws_s3_bucket_public_access_block",
        "aws_s3_bucket_ownership_controls",
        "aws_s3_bucket_server_side_encryption_configuration",
        "aws_s3_bucket_versioning",
        "aws_s3_bucket_lifecycle_configuration",
        "aws_s3_bucket_policy",
    ):
        assert s3_resource(type_)["bucket"] == "${aws_s3_bucket.this.id}", type_
    bucket = s3_resource("aws_s3_bucket")
    assert bucket["bucket"] == "${var.bucket_name}"
    assert bucket["tags"] == "${var.tags}"
    # The deprecated inline settings would fight the separate resources.
    for inline in (
        "acl",
        "policy",
        "versioning",
        "lifecycle_rule",
        "server_side_encryption_configuration",
    ):
        assert inline not in bucket, inline


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("my-checkpoints", True),
        ("ckpt.team-a", True),
        ("ab", False),
        ("My-Bucket", False),
        ("-bucket", False),
        ("x" * 64, False),
    ],
)
def test_s3_bucket_name_validation(name: str, ok: bool) -> None:
    assert bool(validation_regex(S3_MODULE, "bucket_name").fullmatch(name)) is ok


def test_s3_public_access_is_blocked() -> None:
    block = s3_resource("aws_s3_bucket_public_access_block")
    for setting in (
        "block_public_acls",
        "block_public_policy",
        "ignore_public_acls",
        "restrict_public_buckets",
    ):
        assert block[setting] is True, setting


def test_s3_acls_are_disabled() -> None:
    rule = one(s3_resource("aws_s3_bucket_ownership_controls"), "rule")
    assert rule["object_ownership"] == "BucketOwnerEnforced"
    for type_, _, _ in all_typed(parse_dir(S3_MODULE), "resource"):
        assert type_ != "aws_s3_bucket_acl"


def test_s3_encryption_is_sse_s3_by_default_and_kms_optional() -> None:
    rule = one(s3_resource("aws_s3_bucket_server_side_encryption_configuration"), "rule")
    by_default = one(rule, "apply_server_side_encryption_by_default")
    assert resolve(by_default["sse_algorithm"], S3_MODULE) == "AES256"
    assert unwrap(by_default["sse_algorithm"]) == 'var.kms_key_arn == null ? "AES256" : "aws:kms"'
    assert by_default["kms_master_key_id"] == "${var.kms_key_arn}"
    assert default(S3_MODULE, "kms_key_arn") is None


def test_s3_versioning_is_off_by_default() -> None:
    config = one(s3_resource("aws_s3_bucket_versioning"), "versioning_configuration")
    assert default(S3_MODULE, "versioning_enabled") is False
    assert resolve(config["status"], S3_MODULE) in {"Suspended", "Disabled"}


def lifecycle_rules() -> dict[str, dict[str, Any]]:
    lifecycle = s3_resource("aws_s3_bucket_lifecycle_configuration")
    # Dynamic rule blocks would hide the static ones from checkov.
    assert not dynamic(lifecycle, "rule")
    return {rule["id"]: rule for rule in lifecycle["rule"]}


def test_s3_aborts_incomplete_multipart_uploads_after_one_day() -> None:
    rules = [r for r in lifecycle_rules().values() if "abort_incomplete_multipart_upload" in r]
    assert len(rules) == 1, rules
    (rule,) = rules
    assert rule["status"] == "Enabled"
    assert one(rule, "filter") == {}, "the abort rule must apply to the whole bucket"
    assert one(rule, "abort_incomplete_multipart_upload")["days_after_initiation"] == 1


def test_s3_expiry_is_optional_and_prefix_scoped() -> None:
    rules = [
        r for r in lifecycle_rules().values() if "filter" in r and one(r, "filter").get("prefix")
    ]
    assert len(rules) == 1, rules
    (rule,) = rules
    assert one(rule, "filter")["prefix"] == "${var.expire_prefix}"
    assert default(S3_MODULE, "expire_after_days") is None
    assert resolve(rule["status"], S3_MODULE) == "Disabled"
    assert "var.expire_after_days" in one(rule, "expiration")["days"]
    assert default(S3_MODULE, "expire_prefix") != default(S3_MODULE, "checkpoint_prefix")
    assert ">= 1" in validation_conditions(S3_MODULE, "expire_after_days")


def test_s3_noncurrent_versions_expire_only_with_versioning() -> None:
    rules = [r for r in lifecycle_rules().values() if "noncurrent_version_expiration" in r]
    assert len(rules) == 1, rules
    (rule,) = rules
    assert unwrap(rule["status"]) == 'var.versioning_enabled ? "Enabled" : "Disabled"'
    assert resolve(rule["status"], S3_MODULE) == "Disabled"
    days = one(rule, "noncurrent_version_expiration")["noncurrent_days"]
    assert resolve(days, S3_MODULE) >= 1


def test_s3_bucket_policy_denies_non_tls_requests() -> None:
    policy = s3_resource("aws_s3_bucket_policy")
    assert policy["policy"] == "${data.aws_iam_policy_document.tls_only.json}"
    (statement,) = policy_document("tls_only")
    assert statement["effect"] == "Deny"
    assert statement["actions"] == ["s3:*"]
    assert set(statement["resources"]) == {
        "${aws_s3_bucket.this.arn}",
        "${aws_s3_bucket.this.arn}/*",
    }
    principals = one(statement, "principals")
    assert principals == {"type": "*", "identifiers": ["*"]}
    condition = one(statement, "condition")
    assert condition == {"test": "Bool", "variable": "aws:SecureTransport", "values": ["false"]}


def test_s3_training_policy_grants_exactly_what_cloudckpt_uses() -> None:
    statements = policy_document("training")
    granted: set[str] = set()
    for statement in statements:
        assert statement.get("effect", "Allow") == "Allow"
        assert "not_actions" not in statement and "not_resources" not in statement
        granted |= set(statement["actions"])
    assert granted == S3_ALLOWED_ACTIONS

    by_sid = {s["sid"]: s for s in statements}
    objects = by_sid["CheckpointObjects"]
    assert "s3:ListBucket" not in objects["actions"]
    assert objects["resources"] == ["${local.prefix_objects_arn}"]
    assert (
        locals_of(S3_MODULE)["prefix_objects_arn"]
        == "${aws_s3_bucket.this.arn}/${var.checkpoint_prefix}*"
    )

    listing = by_sid["ListCheckpointPrefix"]
    assert listing["actions"] == ["s3:ListBucket"]
    assert listing["resources"] == ["${aws_s3_bucket.this.arn}"]
    condition = one(listing, "condition")
    assert condition["test"] == "StringLike" and condition["variable"] == "s3:prefix"
    assert condition["values"] == ["${var.checkpoint_prefix}", "${var.checkpoint_prefix}*"]

    policy = s3_resource("aws_iam_policy")
    assert policy["policy"] == "${data.aws_iam_policy_document.training.json}"


def test_no_wildcard_grants_anywhere() -> None:
    for path in TF_FILES:
        for _, name, body in all_typed(parse_file(path), "data"):
            for statement in body.get("statement", []):
                if statement.get("effect", "Allow") != "Allow":
                    continue
                for action in statement.get("actions", []):
                    assert "*" not in action, f"{path}: {name} allows {action}"
                assert "*" not in statement.get("resources", []), (
                    f"{path}: {name} allows every resource"
                )
        text = path.read_text(encoding="utf-8")
        assert not re.search(r'"Action"\s*[:=]\s*"(s3:)?\*"', text), path


def test_s3_policy_attachment_is_optional() -> None:
    attachment = s3_resource("aws_iam_role_policy_attachment")
    assert unwrap(attachment["count"]) == "var.training_role_name == null ? 0 : 1"
    assert attachment["role"] == "${var.training_role_name}"
    assert attachment["policy_arn"] == "${aws_iam_policy.training.arn}"
    assert default(S3_MODULE, "training_role_name") is None


def test_s3_outputs() -> None:
    outputs = labelled(parse_dir(S3_MODULE), "output")
    assert outputs["bucket_url"]["value"] == "s3://${aws_s3_bucket.this.id}"
    assert outputs["checkpoint_url"]["value"].startswith("s3://${aws_s3_bucket.this.id}/")
    assert outputs["region"]["value"] == "${aws_s3_bucket.this.region}"
    assert outputs["policy_arn"]["value"] == "${aws_iam_policy.training.arn}"
    environment = outputs["environment"]["value"]
    assert environment["AWS_REGION"] == outputs["region"]["value"]
    assert environment["CHECKPOINT_URL"] == outputs["checkpoint_url"]["value"]


# --------------------------------------------------------------------------
# Examples
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("example", "module"),
    [(TPU_EXAMPLE, GCS_MODULE), (GPU_EXAMPLE, S3_MODULE)],
    ids=lambda p: p.name,
)
def test_example_uses_module_and_documents_the_workflow(example: Path, module: Path) -> None:
    (call,) = labelled(parse_dir(example), "module").values()
    assert (example / call["source"]).resolve() == module.resolve()
    # Every required module variable is passed.
    required = {name for name, var in variables(module).items() if "default" not in var}
    assert required <= set(call), f"{example.name} misses {required - set(call)}"
    assert set(call) - {"source"} <= set(variables(module)), "example passes unknown variables"

    outputs = labelled(parse_dir(example), "output")
    assert outputs["checkpoint_url"]["value"] == "${module.checkpoints.checkpoint_url}"

    readme = (example / "README.md").read_text(encoding="utf-8")
    for step in (
        "terraform init",
        "terraform plan",
        "terraform apply",
        "terraform output",
        "CheckpointManager(",
    ):
        assert step in readme, f"{example.name}/README.md does not show {step!r}"


def test_examples_put_the_bucket_in_the_accelerator_region() -> None:
    (gcs_call,) = labelled(parse_dir(TPU_EXAMPLE), "module").values()
    (provider,) = [p["google"] for p in parse_dir(TPU_EXAMPLE)["provider"]]
    assert gcs_call["location"] == provider["region"] == "${var.region}"
    (aws_provider,) = [p["aws"] for p in parse_dir(GPU_EXAMPLE)["provider"]]
    assert aws_provider["region"] == "${var.region}"


def test_terraform_readme_covers_the_reasons() -> None:
    readme = (TF_ROOT / "README.md").read_text(encoding="utf-8").lower()
    for topic in ("soft delete", "multipart", "region", "least privilege", "checkov"):
        assert topic in readme, topic


# --------------------------------------------------------------------------
# checkov
# --------------------------------------------------------------------------


def checkov_bin() -> Path:
    configured = os.environ.get("CHECKOV_BIN")
    path = Path(configured) if configured else REPO_ROOT / ".venv-checkov" / "bin" / "checkov"
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(
            f"checkov not found at {path}. It lives in its own virtualenv because its pinned "
            "dependencies (boto3/botocore, packaging) conflict with the main one: run `make test`, "
            "or `python3 -m venv .venv-checkov && .venv-checkov/bin/pip install -r "
            "tests/checkov_requirements.txt`, or set CHECKOV_BIN.",
            pytrace=False,
        )
    return path


def test_checkov_reports_no_failed_checks() -> None:
    cmd = [
        str(checkov_bin()),
        "--directory",
        str(TF_ROOT),
        "--framework",
        "terraform",
        "--output",
        "json",
        # Offline: no policy metadata download from the vendor's platform.
        "--skip-download",
    ]
    started = time.monotonic()
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240, check=False
    )
    elapsed = time.monotonic() - started
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(
            f"checkov printed no JSON (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    reports = report if isinstance(report, list) else [report]
    (tf_report,) = [r for r in reports if r.get("check_type") == "terraform"]
    summary = tf_report["summary"]
    results = tf_report["results"]
    print(
        f"checkov {summary.get('checkov_version')} summary: passed={summary['passed']} "
        f"failed={summary['failed']} skipped={summary['skipped']} "
        f"parsing_errors={summary['parsing_errors']} resources={summary['resource_count']} "
        f"in {elapsed:.1f}s"
    )
    failures = [
        f"{c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path']}:{c['file_line_range']})"
        for c in results.get("failed_checks", [])
    ]
    assert not failures, "checkov failed checks:\n" + "\n".join(failures)
    assert summary["parsing_errors"] == 0, results.get("parsing_errors")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # It really looked at the buckets, and skipped only what the code says.
    scanned = {
        c["resource"].split(".", 2)[-1] if c["resource"].startswith("module.") else c["resource"]
        for c in results.get("passed_checks", [])
    }
    for resource in (
        "google_storage_bucket.this",
        "aws_s3_bucket.this",
        "aws_s3_bucket_lifecycle_configuration.this",
        "aws_s3_bucket_public_access_block.this",
    ):
        assert resource in scanned, f"checkov did not check {resource}"
    assert {c["check_id"] for c in results.get("skipped_checks", [])} == EXPECTED_CHECKOV_SKIPS
    passed_ids = {c["check_id"] for c in results.get("passed_checks", [])}
    for check_id in ("CKV_AWS_300", "CKV_GCP_114", "CKV_GCP_29", "CKV2_AWS_6", "CKV2_AWS_65"):
        assert check_id in passed_ids, f"checkov did not pass {check_id}"
