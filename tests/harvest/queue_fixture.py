"""A real SQLite query queue filled by the exported digits model: known digits, unknown digits 8-9 and
noise, each queued with what the gateway stores (model input, logits, features, scores, decision)."""

from oodguard.datasets import load_dataset
from oodguard.evaluation import VersionScorer, uniform_noise
from oodguard.queues.base import NewRecord
from oodguard.queues.sqlite import SQLiteQueue

KINDS = ("known", "unknown", "noise")


def filled_queue(digits_export, path, per_kind=40, queue=None):
    """(queue, record id → kind, repository); ``queue`` defaults to a new SQLite queue at ``path``."""
    record, result, repository, _ = digits_export
    scorer = VersionScorer(result.version_dir)
    digits = load_dataset("digits")
    sets = {
        "known": record.part(record.dataset(), "test").images[:per_kind],
        "unknown": digits.select_classes([8, 9]).images[:per_kind],
        "noise": uniform_noise(per_kind, (8, 8), seed=5).images,
    }
    queue = queue if queue is not None else SQLiteQueue(path)
    truth = {}
    for kind, images in sets.items():
        x = scorer.preprocessing.apply(images)
        out = scorer.model.run(x)
        records = [NewRecord(model="digits", version=result.version, input=x[i], logits=out["logits"][i],
                             features=out["features"][i], scores={s: float(out[s][i]) for s in scorer.score_names},
                             decision={"ood": kind != "known", "deciding": ["sisome"]}, flagged=True,
                             request_id=f"{kind}-{i}", metadata={"kind": kind})
                   for i in range(len(x))]
        for record_id, item in zip(queue.put(records), records):
            truth[record_id] = kind
    return queue, truth, repository


def queue_images(queue, version_dir, images, kind: str, model: str = "digits") -> list[str]:
    """Queue uint8 ``images`` as the version at ``version_dir`` (``<repo>/<model>/<version>``) would; their ids."""
    scorer = VersionScorer(version_dir)
    x = scorer.preprocessing.apply(images)
    out = scorer.model.run(x)
    version = int(version_dir.name)
    records = [NewRecord(model=model, version=version, input=x[i], logits=out["logits"][i], features=out["features"][i],
                         scores={s: float(out[s][i]) for s in scorer.score_names},
                         decision={"ood": True, "deciding": ["sisome"]}, flagged=True, request_id=f"{kind}-{i}",
                         metadata={"kind": kind}) for i in range(len(x))]
    return queue.put(records)
