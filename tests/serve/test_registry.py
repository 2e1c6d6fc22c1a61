import asyncio
import json
import shutil

import numpy as np
import pytest

from oodguard.serve.backend import InferenceResult
from oodguard.serve.decision import DecisionPolicy
from oodguard.serve.embedded import EmbeddedBackend
from oodguard.serve.registry import Registry, UnknownModel


def add_version(repository, number: int, calibration_text: str | None = None):
    target = repository / "digits" / str(number)
    staging = repository / "digits" / f".staging-{number}"
    shutil.copytree(repository / "digits" / "1", staging)
    if calibration_text is not None:
        (staging / "calibration.json").write_text(calibration_text)
    staging.rename(target)
    return target


async def setup(repository, policy=DecisionPolicy()):
    backend = EmbeddedBackend(repository, poll_interval_s=3600)
    await backend.start()
    states = []

    async def on_state(serving, reason):
        states.append((serving, reason))

    registry = Registry(backend, repository, policy, poll_interval_s=3600, on_state=on_state)
    await registry.start()
    return backend, registry, states


def test_bad_calibration_is_refused_and_the_older_version_stays(repo_copy, caplog):
    async def main():
        backend, registry, states = await setup(repo_copy)
        try:
            assert registry.resolve(None, None).version == 1 and states[-1] == (True, "")
            folder = add_version(repo_copy, 2, "{not json")
            await backend.refresh()
            await registry.refresh()
            assert (await backend.ready_versions())["digits"] == [1, 2]  # the backend has it, the gateway refuses it
            assert registry.resolve("digits", None).version == 1
            assert "not valid JSON" in registry.refused[("digits", 2)][1]
            with pytest.raises(UnknownModel, match="no version 2"):
                registry.resolve("digits", 2)
            # fixed calibration file: admitted on the next refresh
            good = (repo_copy / "digits" / "1" / "calibration.json").read_text()
            (folder / "calibration.json").write_text(good)
            await registry.refresh()
            assert registry.resolve("digits", None).version == 2 and ("digits", 2) not in registry.refused
            # a version whose calibration lacks a threshold is refused too
            raw = json.loads(good)
            del raw["scores"]["sisome"]
            add_version(repo_copy, 3, json.dumps(raw))
            await backend.refresh()
            await registry.refresh()
            assert registry.resolve(None, None).version == 2
            assert "no threshold for score(s) ['sisome']" in registry.refused[("digits", 3)][1]
        finally:
            await registry.close()
            await backend.close()

    with caplog.at_level("ERROR"):
        asyncio.run(main())
    assert any("version 2 refused" in r.getMessage() for r in caplog.records)


def test_in_flight_request_finishes_on_its_version(repo_copy):
    async def main():
        backend, registry, _ = await setup(repo_copy)
        try:
            served = registry.resolve(None, None)  # a request resolves its version when it arrives...
            x = np.zeros((1, *served.input_shape), np.float32)
            add_version(repo_copy, 2)
            await backend.refresh()
            await registry.refresh()  # ... v2 is admitted while it waits ...
            after = registry.resolve(None, None)
            result = await backend.infer(served.model, served.version, x, 10)  # ... and it still runs on v1
            return served.version, result.version, after.version
        finally:
            await registry.close()
            await backend.close()

    assert asyncio.run(main()) == (1, 1, 2)


def test_policy_naming_a_missing_score_is_refused_with_the_exported_list(repo_copy):
    async def main():
        backend, registry, states = await setup(repo_copy, DecisionPolicy(("sisome", "mahalanobis"), "any", ()))
        try:
            return dict(registry.policy_errors), registry.serving, states[-1]
        finally:
            await registry.close()
            await backend.close()

    errors, serving, state = asyncio.run(main())
    assert not serving and state == (False, "no model version ready")
    message = errors[("digits", 1)]
    assert "['mahalanobis']" in message and "sisome" in message and "energy" in message


def test_resolve_errors(repo_copy):
    async def main():
        backend, registry, _ = await setup(repo_copy)
        try:
            with pytest.raises(UnknownModel, match=r"unknown model 'cifar' \(served: digits\)"):
                registry.resolve("cifar", None)
            return registry.resolve("", 0).version, registry.resolve("digits", 1).max_batch
        finally:
            await registry.close()
            await backend.close()

    assert asyncio.run(main()) == (1, 64)


def test_a_version_exported_without_fused_is_served_by_the_fallback_and_says_so(repo_copy, caplog):
    """Version 2 is what an export before `fused` existed wrote: the default policy (fused) falls back to
    sisome for it, with a log line, while version 1 keeps deciding by fused."""
    raw = json.loads((repo_copy / "digits" / "1" / "calibration.json").read_text())
    raw["model"]["scores"].remove("fused")
    del raw["scores"]["fused"]
    add_version(repo_copy, 2, json.dumps(raw))

    async def main():
        backend, registry, _ = await setup(repo_copy)
        try:
            return {v: registry.resolve("digits", v).rule.policy for v in (1, 2)}
        finally:
            await registry.close()
            await backend.close()

    with caplog.at_level("WARNING"):
        policies = asyncio.run(main())
    assert policies[1].scores == ("fused",) and policies[2].scores == ("sisome",)
    assert any("version 2 exports no fused score: decided by the fallback any(sisome)" in r.getMessage()
               for r in caplog.records)


class ConfigLimitedBackend(EmbeddedBackend):
    """The embedded backend returning only the outputs in ``served``, as Triton does under a config that declares
    only the outputs common to the versions it serves."""

    served: frozenset[str] = frozenset()

    async def served_outputs(self, model, version):
        return self.served

    async def infer(self, model, version, inputs, timeout_s):
        result = await super().infer(model, version, inputs, timeout_s)
        return InferenceResult(result.model, result.version, {k: v for k, v in result.outputs.items() if k in self.served})


def test_a_version_is_scored_with_the_outputs_its_backend_serves_and_follows_them(repo_copy, caplog):
    """A config without fused and gradnorm: the version is admitted with the other scores, decided by the
    fallback (the log says why); when the served set grows back, the version is re-admitted with every score."""
    exported = json.loads((repo_copy / "digits" / "1" / "calibration.json").read_text())["model"]["outputs"]
    backend = ConfigLimitedBackend(repo_copy, poll_interval_s=3600)
    backend.served = frozenset(exported) - {"fused", "gradnorm"}

    async def main():
        await backend.start()
        registry = Registry(backend, repo_copy, DecisionPolicy(), poll_interval_s=3600)
        await registry.start()
        try:
            limited = registry.resolve("digits", 1)
            x = np.zeros((2, *limited.input_shape), np.float32)
            decisions = limited.rule((await backend.infer("digits", 1, x, 10)).outputs)
            backend.served = frozenset(exported)
            await registry.refresh()
            full = registry.resolve("digits", 1)
            return limited, decisions, full
        finally:
            await registry.close()
            await backend.close()

    with caplog.at_level("INFO"):
        limited, decisions, full = asyncio.run(main())
    scores = [s for s in exported[2:] if s not in ("fused", "gradnorm")]
    assert list(limited.scores) == list(decisions.names) == scores
    assert limited.outputs == ("logits", "features", *scores)
    assert limited.rule.policy.scores == ("sisome",) and decisions.deciding == ("sisome",)
    assert any("version 1 is served (by the backend's config) with no fused score: decided by the fallback any(sisome)"
               in r.getMessage() for r in caplog.records)
    assert any("score(s) ['gradnorm', 'fused'] are not served" in r.getMessage() for r in caplog.records)
    assert full is not limited and list(full.scores) == exported[2:] and full.rule.policy.scores == ("fused",)


def test_with_two_models_and_no_name_the_error_says_how_to_choose(repo_copy):
    """A second model in the repository: a request naming none is told to name one (clients: --model) or to give
    the gateway a default; with --default-model it goes there. Nothing served at all is an outage."""
    shutil.copytree(repo_copy / "digits", repo_copy / "other")

    async def main(default_model=""):
        backend = EmbeddedBackend(repo_copy, poll_interval_s=3600)
        await backend.start()
        registry = Registry(backend, repo_copy, DecisionPolicy(), poll_interval_s=3600, default_model=default_model)
        await registry.start()
        try:
            if default_model:
                return registry.resolve(None, None).model
            with pytest.raises(UnknownModel, match=r"several models are served \(digits, other\): name one in 'model' "
                                                   r"\(clients: --model NAME\), or start the gateway with --default-model"):
                registry.resolve(None, None)
            return None
        finally:
            await registry.close()
            await backend.close()

    assert asyncio.run(main()) is None
    assert asyncio.run(main("other")) == "other"
