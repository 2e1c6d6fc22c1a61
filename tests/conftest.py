"""Shared fixtures. Tests that need ../shared/data skip when it is absent, unless OODGUARD_REQUIRE_DATA=1
(set by .ci/run), where the absence is a failure."""

from __future__ import annotations

from pathlib import Path

import pytest
from missing import missing

from oodguard.datasets import DATA_HELP, data_root

SHARED_DATA = data_root()  # $OODGUARD_DATA, else ../shared/data


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "mnist").is_dir():
        missing(f"MNIST/Fashion-MNIST not found at {SHARED_DATA}. {DATA_HELP}", "OODGUARD_REQUIRE_DATA")
    return SHARED_DATA


@pytest.fixture(scope="session")
def digits_export(tmp_path_factory):
    """The digits demo model (LeNet-5 on digits 0-7), trained and exported once per test session.

    Returns (training record, export result, repository path, checkpoint path)."""
    from oodguard.export.pipeline import export_model
    from oodguard.export.spec import spec_from_training
    from oodguard.export.training_job import CHECKPOINT_FILE, run_training

    work = tmp_path_factory.mktemp("digits-train")
    repository = tmp_path_factory.mktemp("repo")
    record = run_training(backbone="lenet5", data="digits", out_dir=work, classes=list(range(8)),
                          epochs=30, seed=0, holdout=0.4, progress=lambda line: None)
    result = export_model(spec_from_training(work / CHECKPOINT_FILE, repository, "digits"), progress=lambda line: None)
    return record, result, repository, work / CHECKPOINT_FILE


@pytest.fixture(scope="session")
def digits_export_ml(digits_export, tmp_path_factory):
    """The same digits model exported with the multi-layer scores (``oodguard export --multi-layer``) into a
    repository of its own. Returns (training record, export result, repository path, checkpoint path)."""
    from oodguard.export.pipeline import export_model
    from oodguard.export.spec import spec_from_training

    record, _, _, checkpoint = digits_export
    repository = tmp_path_factory.mktemp("repo-ml")
    result = export_model(spec_from_training(checkpoint, repository, "digits", multi_layer=True), progress=lambda line: None)
    return record, result, repository, checkpoint


@pytest.fixture(scope="session")
def digits_two_versions(digits_export, tmp_path_factory):
    """A repository holding the digits demo model twice: version 1 (digits 0-7, as ``digits_export``) and
    version 2, retrained on digits 0-8 (an added class, '8', at index 8). Returns (repository, v2 training
    record, v2 checkpoint)."""
    import shutil

    from oodguard.export.pipeline import export_model
    from oodguard.export.spec import spec_from_training
    from oodguard.export.training_job import CHECKPOINT_FILE, run_training

    repository = tmp_path_factory.mktemp("repo-v1-v2") / "repo"
    shutil.copytree(digits_export[2], repository)
    work = tmp_path_factory.mktemp("digits-train-v2")
    record = run_training(backbone="lenet5", data="digits", out_dir=work, classes=list(range(9)),
                          epochs=30, seed=1, holdout=0.4, progress=lambda line: None)
    result = export_model(spec_from_training(work / CHECKPOINT_FILE, repository, "digits"), progress=lambda line: None)
    assert result.version == 2
    return repository, record, work / CHECKPOINT_FILE


from redis_fixtures import redis_server  # noqa: E402,F401  (the real redis-server fixture, for tests/serve and tests/integration)
from label_studio_fixtures import label_studio  # noqa: E402,F401  (the real Label Studio server, for tests/integration)
