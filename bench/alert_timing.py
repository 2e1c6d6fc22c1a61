"""False-page rate and time to fire of ``OODGuardFlaggedRateAboveCalibration`` (deploy/prometheus/rules.yml).

    python bench/alert_timing.py [--repository DIR] [--duration 40] [--concurrency 4] [--rate 0]
                                 [--out runs/bench/alert-report]

1. Starts a gateway (embedded backend, ``--metrics-port``) on the digits demo model (``--repository``, default
   ``model_repository/`` when it serves ``digits``, else a fresh ``oodguard export --demo digits``) and runs
   ``oodguard loadgen`` twice: held-out in-distribution digits (the training record's ``test`` split, classes
   0-7, never used for training or calibration) and the same with 20% uniform-noise requests
   (``--ood-fraction 0.2``). ``/metrics`` is scraped around each run: items, flagged items and the calibrated
   p0 gauges come from the gateway's own counters.
2. Turns those measured per-minute rates into promtool ``input_series`` (one sample per minute, Poisson item
   counts and binomial flagged counts with a fixed seed, written as explicit values) over a long simulated
   timeline: (a) 24 h of in-distribution traffic, (b) 2 h of in-distribution traffic, then the 20%-OOD mix.
   ``alert_rule_test`` entries expect no alert at every 5 min (a) / every minute (b); the failing eval times
   of ``promtool test rules`` against the real rules.yml are the times the alert was firing.
3. Compares with the analytic expectation from the rule's bound ``n·p0 + 4·sqrt(n·p0·(1-p0))`` and writes
   ``report.md`` + ``report.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
ALERT = "OODGuardFlaggedRateAboveCalibration"
Z = 4.0           # the rule's z
MIN_ITEMS = 200   # the rule's minimum count per hour
FOR_MIN = 10      # the rule's `for:`
WINDOW_MIN = 60   # the rule's 1h window


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def oodguard_cmd() -> list[str]:
    exe = shutil.which("oodguard", path=str(Path(sys.executable).parent)) or shutil.which("oodguard")
    return [exe] if exe else [sys.executable, "-m", "oodguard.cli"]


# --------------------------------------------------------------------------------------------- gateway and load
def ensure_repository(repository: Path | None, tmp: Path) -> tuple[Path, Path | None]:
    """(repository serving digits, its training record or None)."""
    if repository is None and (ROOT / "model_repository" / "digits").is_dir():
        repository = ROOT / "model_repository"
    if repository is None:
        repository = tmp / "repository"
        subprocess.run(oodguard_cmd() + ["export", "--demo", "digits", "--repository", str(repository)],
                       check=True, cwd=tmp, stdout=subprocess.DEVNULL)
    record = None
    for cand in [ROOT / "runs" / "digits-demo" / "training.json", *tmp.rglob("training.json")]:
        if cand.exists():
            record = cand
            break
    return repository, record


def held_out_npz(record: Path | None, tmp: Path) -> tuple[str, str]:
    """The training record's test split (classes 0-7) as .npz; fallback: all digits of classes 0-7."""
    from oodguard.datasets import load_dataset

    if record is not None:
        from oodguard.export.training_job import TrainingRecord

        rec = TrainingRecord.load(record)
        data = rec.part(rec.dataset(), "test")
        shown = record.relative_to(ROOT) if record.is_relative_to(ROOT) else record
        what = f"test split of {shown} ({len(data)} images, classes {rec.classes})"
    else:
        data = load_dataset("digits").select_classes(list(range(8)))
        what = f"digits classes 0-7 ({len(data)} images; no training record found, includes training images)"
    path = tmp / "id-heldout.npz"
    np.savez(path, images=data.images, labels=data.labels)
    return str(path), what


def scrape(port: int) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {"items": 0.0, "flagged": 0.0, "p0": None, "p0_upper": None}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.labels.get("model") != "digits":
                continue
            if s.name == "oodguard_items_total":
                out["items"] += s.value
            elif s.name == "oodguard_flagged_items_total":
                out["flagged"] += s.value
            elif s.name == "oodguard_calibrated_flag_rate":
                out["p0"] = max(out["p0"] or 0.0, s.value)
            elif s.name == "oodguard_calibrated_flag_rate_upper":
                out["p0_upper"] = max(out["p0_upper"] or 0.0, s.value)
    return out


def start_gateway(repository: Path, tmp: Path) -> tuple[subprocess.Popen, int, int]:
    grpc_port, metrics_port = free_port(), free_port()
    log = open(tmp / "gateway.log", "w")
    proc = subprocess.Popen(oodguard_cmd() + ["serve", "--repository", str(repository), "--backend", "embedded",
                                              "--listen", f"127.0.0.1:{grpc_port}", "--metrics-port", str(metrics_port),
                                              "--queue-path", str(tmp / "queue.sqlite"), "--log-level", "WARNING"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited ({proc.returncode}): {(tmp / 'gateway.log').read_text()[-2000:]}")
        try:
            m = scrape(metrics_port)
            if m["p0_upper"] is not None:
                return proc, grpc_port, metrics_port
        except OSError:
            pass
        time.sleep(0.5)
    stop(proc)
    raise RuntimeError("gateway did not come up in 60 s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def loadgen(grpc_port: int, data: str, duration: float, concurrency: int, rate: float, ood: float, seed: int) -> dict:
    cmd = oodguard_cmd() + ["loadgen", "--target", f"127.0.0.1:{grpc_port}", "--data", data, "--duration",
                            str(duration), "--concurrency", str(concurrency), "--rate", str(rate), "--seed",
                            str(seed), "--json"]
    if ood:
        cmd += ["--ood-fraction", str(ood)]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(res.stdout)


def measured_run(name: str, port: int, grpc_port: int, args, data: str, ood: float) -> dict:
    before = scrape(port)
    report = loadgen(grpc_port, data, args.duration, args.concurrency, args.rate, ood, args.seed)
    after = scrape(port)
    items, flagged = after["items"] - before["items"], after["flagged"] - before["flagged"]
    elapsed = report["elapsed_s"]
    return {"name": name, "ood_fraction": ood, "elapsed_s": elapsed, "requests": report["requests"],
            "ok": report["ok"], "errors": report["errors"], "req_per_s": report["throughput_rps"],
            "items": items, "flagged": flagged, "items_per_min": items / elapsed * 60.0,
            "flagged_share": flagged / items if items else None,
            "loadgen_flagged_share": report["flagged_share"], "by_source": report["by_source"],
            "latency_ms": report["latency_ms"], "p0": after["p0"], "p0_upper": after["p0_upper"]}


# ----------------------------------------------------------------------------------------------- promtool
def counter_values(items_per_min: np.ndarray, flagged_per_min: np.ndarray) -> tuple[str, str]:
    items = np.concatenate([[0], np.cumsum(items_per_min)])
    flagged = np.concatenate([[0], np.cumsum(flagged_per_min)])
    return " ".join(str(int(v)) for v in items), " ".join(str(int(v)) for v in flagged)


def simulate(minutes_share: np.ndarray, items_rate: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    items = rng.poisson(items_rate, size=len(minutes_share))
    flagged = rng.binomial(items, minutes_share)
    return items, flagged


def promtool_firing(tmp: Path, name: str, items: np.ndarray, flagged: np.ndarray, p0: float, p0_upper: float,
                    eval_minutes: list[int]) -> tuple[list[int], float]:
    """Eval minutes (of ``eval_minutes``) at which the alert was firing, and promtool's run time."""
    iv, fv = counter_values(items, flagged)
    n = len(items)
    lab = 'job="oodguard",instance="a",model="digits",version="1"'
    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": f"oodguard_items_total{{{lab}}}", "values": iv},
                {"series": f"oodguard_flagged_items_total{{{lab}}}", "values": fv},
                {"series": f"oodguard_calibrated_flag_rate{{{lab}}}", "values": f"{p0!r}x{n}"},
                {"series": f"oodguard_calibrated_flag_rate_upper{{{lab}}}", "values": f"{p0_upper!r}x{n}"},
            ],
            "alert_rule_test": [{"eval_time": f"{m}m", "alertname": ALERT, "exp_alerts": []} for m in eval_minutes],
        }],
    }
    path = tmp / f"{name}.test.json"  # promtool reads YAML; JSON is YAML
    path.write_text(json.dumps(test))
    t0 = time.monotonic()
    res = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True)
    took = time.monotonic() - t0
    out = res.stdout + res.stderr
    if res.returncode not in (0, 1) or ("FAILED" not in out and res.returncode != 0):
        raise RuntimeError(f"promtool failed: {out[-3000:]}")
    firing = sorted({parse_duration(m) for m in re.findall(rf"alertname: {ALERT}, time: (\S+?),", out)})
    return firing, took


def parse_duration(text: str) -> int:
    """promtool's Go duration (``1h5m0s``) in whole minutes."""
    total = 0.0
    for value, unit in re.findall(r"([\d.]+)(h|m|s)", text):
        total += float(value) * {"h": 60, "m": 1, "s": 1 / 60}[unit]
    return int(round(total))


def episodes(minutes: list[int], step: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for m in minutes:
        if out and m - out[-1][1] <= step:
            out[-1] = (out[-1][0], m)
        else:
            out.append((m, m))
    return out


# ----------------------------------------------------------------------------------------------- analytics
def bound(n: float, p0u: float) -> float:
    return n * p0u + Z * math.sqrt(n * p0u * (1 - p0u))


def analytic(items_per_min: float, share_id: float, share_ood: float, p0: float, p0u: float) -> dict:
    from scipy import stats

    n = items_per_min * WINDOW_MIN
    b = bound(n, p0u)
    # per-evaluation probability that the hour's flagged count exceeds the bound
    p_exceed_measured = float(stats.binom.sf(math.floor(b), round(n), share_id)) if n >= MIN_ITEMS else 0.0
    p_exceed_design = float(stats.binom.sf(math.floor(b), round(n), p0)) if n >= MIN_ITEMS else 0.0
    z_measured = (n * share_id - n * p0u) / math.sqrt(n * p0u * (1 - p0u)) if n else float("nan")
    # deterministic time to fire: k OOD minutes in the window push the expected count over the bound, + `for:`
    k_cross = None
    for k in range(0, WINDOW_MIN + 1):
        if n >= MIN_ITEMS and items_per_min * (k * share_ood + (WINDOW_MIN - k) * share_id) > b:
            k_cross = k
            break
    # smallest hourly volume at which the OOD share alone (full window) would page
    n_min_ood = None
    if share_ood > p0u:
        n_min_ood = max(MIN_ITEMS, math.ceil((Z ** 2) * p0u * (1 - p0u) / (share_ood - p0u) ** 2))
    return {"items_per_hour": n, "bound_flagged_per_hour": b, "bound_share": b / n if n else None,
            "z_of_measured_id_share": z_measured,
            "p_exceed_per_eval_measured_id_share": p_exceed_measured,
            "p_exceed_per_eval_at_design_p0": p_exceed_design,
            "p_exceed_at_p0_upper_normal": float(stats.norm.sf(Z)),
            "expected_exceed_minutes_per_day_measured": 1440 * p_exceed_measured,
            "ood_minutes_to_cross": k_cross,
            "expected_minutes_to_fire": None if k_cross is None else k_cross + FOR_MIN,
            "min_items_per_hour_for_ood_share_to_page": n_min_ood}


def scenario(tmp: Path, name: str, rate: float, share_id: float, share_ood: float, p0: float, p0u: float, args,
             rng: np.random.Generator) -> dict:
    """promtool runs (a) hours of ID traffic, (b) ID then the OOD mix, at ``rate`` items/min; plus the analytic view."""
    tag = re.sub(r"[^a-z0-9]+", "-", name.lower())
    n_a = int(round(args.id_hours * 60))
    items_a, flagged_a = simulate(np.full(n_a, share_id), rate, rng)
    evals_a = list(range(5, n_a + 1, 5))
    firing_a, took_a = promtool_firing(tmp, f"{tag}-id", items_a, flagged_a, p0, p0u, evals_a)
    t_switch, n_b = args.shift_after_min, args.shift_after_min + args.shift_tail_min
    shares_b = np.where(np.arange(n_b) < t_switch, share_id, share_ood)  # minute i covers (i, i+1]
    items_b, flagged_b = simulate(shares_b, rate, rng)
    firing_b, took_b = promtool_firing(tmp, f"{tag}-shift", items_b, flagged_b, p0, p0u, list(range(1, n_b + 1)))
    before = [m for m in firing_b if m <= t_switch]
    after = [m for m in firing_b if m > t_switch]
    eps = episodes(firing_a, 5)
    return {"name": name, "items_per_min": rate, "id_flagged_share": share_id, "ood_mix_flagged_share": share_ood,
            "id_24h": {"hours": args.id_hours, "eval_every_min": 5, "evals": len(evals_a),
                       "firing_evals": len(firing_a), "firing_minutes_sampled": firing_a, "firing_episodes": eps,
                       "false_pages_per_day": len(eps) * 24 / args.id_hours, "promtool_s": took_a},
            "shift": {"switch_at_min": t_switch, "eval_every_min": 1, "firing_before_switch": before,
                      "first_firing_min": after[0] if after else None,
                      "minutes_from_switch_to_fire": (after[0] - t_switch) if after else None,
                      "promtool_s": took_b},
            "analytic": analytic(rate, share_id, share_ood, p0, p0u)}


# ------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=None)
    parser.add_argument("--duration", type=float, default=40.0, help="seconds per loadgen run")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rate", type=float, default=0.0, help="loadgen requests/s (0: unlimited)")
    parser.add_argument("--ood-fraction", type=float, default=0.2)
    parser.add_argument("--id-hours", type=float, default=24.0)
    parser.add_argument("--shift-after-min", type=int, default=120)
    parser.add_argument("--shift-tail-min", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "alert-report")
    args = parser.parse_args(argv)
    if not shutil.which("promtool"):
        print("promtool not found (scripts/setup_prometheus.sh)", file=sys.stderr)
        return 2
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="oodguard-alert-") as td:
        tmp = Path(td)
        repository, record = ensure_repository(args.repository, tmp)
        id_data, id_what = held_out_npz(record, tmp)
        proc, grpc_port, metrics_port = start_gateway(repository, tmp)
        try:
            loadgen(grpc_port, id_data, 3, args.concurrency, args.rate, 0.0, args.seed + 99)  # warm-up
            run_id = measured_run("in-distribution", metrics_port, grpc_port, args, id_data, 0.0)
            run_ood = measured_run(f"{args.ood_fraction:.0%} OOD", metrics_port, grpc_port, args, id_data,
                                   args.ood_fraction)
        finally:
            stop(proc)
        p0, p0u = run_id["p0"], run_id["p0_upper"]
        rate = run_id["items_per_min"]          # the same offered traffic in both phases
        share_id, share_ood = run_id["flagged_share"], run_ood["flagged_share"]
        main_case = scenario(tmp, "measured", rate, share_id, share_ood, p0, p0u, args,
                             np.random.default_rng(args.seed))
        # sensitivity: lower traffic, and ID traffic flagged at the calibration's p0 (not the test split's share)
        sensitivity = []
        mix_at_p0 = (1 - args.ood_fraction) * p0 + args.ood_fraction * run_ood["by_source"]["ood"]["flagged_share"]
        for r_min in (rate, 600.0, 60.0, 10.0):
            for label, s_id, s_ood in (("measured ID share", share_id, share_ood), ("ID share = p0", p0, mix_at_p0)):
                if r_min == rate and label == "measured ID share":
                    continue
                sensitivity.append(scenario(tmp, f"{r_min:.0f}/min, {label}", r_min, s_id, s_ood, p0, p0u, args,
                                            np.random.default_rng(args.seed)))

    result = {
        "rules": str(RULES.relative_to(ROOT)), "alert": ALERT, "seed": args.seed,
        "id_data": id_what, "repository": str(repository),
        "loadgen": {"duration_s": args.duration, "concurrency": args.concurrency, "rate": args.rate},
        "runs": [run_id, run_ood],
        "calibration": {"p0": p0, "p0_upper": p0u},
        "simulation": main_case,
        "sensitivity": sensitivity,
        "wall_s": time.monotonic() - t_start,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    md = render(result)
    (args.out / "report.md").write_text(md)
    print(md)
    return 0


def render(r: dict) -> str:
    run_id, run_ood = r["runs"]
    sim, cal = r["simulation"], r["calibration"]
    ana = sim["analytic"]
    a, b = sim["id_24h"], sim["shift"]

    def f(v, spec=".4f"):
        return "-" if v is None else format(v, spec)

    lines = [
        f"# {r['alert']}: false pages and time to fire", "",
        f"Rules: `{r['rules']}` (flagged count of the last 1h > n·p0u + 4·sqrt(n·p0u·(1-p0u)), n >= 200, "
        f"`for: 10m`). ID data: {r['id_data']}. Seed {r['seed']}.", "",
        "## Measured (real gateway, embedded backend, counters from /metrics)", "",
        "| run | s | req/s | items/min | flagged / items | flagged share | loadgen by source |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in (run_id, run_ood):
        src = ", ".join(f"{k} {f(v['flagged_share'], '.3f')}" for k, v in run["by_source"].items())
        lines.append(f"| {run['name']} | {run['elapsed_s']:.1f} | {run['req_per_s']:.1f} | {run['items_per_min']:.0f} "
                     f"| {run['flagged']:.0f} / {run['items']:.0f} | {f(run['flagged_share'])} | {src} |")
    lines += [
        "", f"Calibrated p0 = {f(cal['p0'])}, p0 upper (the alert's p0u) = {f(cal['p0_upper'])}.", "",
        "## promtool simulation (real rules.yml, 1-min samples, Poisson items, binomial flagged)", "",
        f"- (a) {a['hours']:g} h of ID traffic at {sim['items_per_min']:.0f} items/min, flagged share "
        f"{f(sim['id_flagged_share'])}: alert firing at {a['firing_evals']}/{a['evals']} evals (every 5 min) "
        f"-> **{a['false_pages_per_day']:g} false pages per 24 h** (episodes: {a['firing_episodes'] or 'none'}).",
        f"- (b) ID for {b['switch_at_min']} min, then the {run_ood['name']} mix (flagged share "
        f"{f(sim['ood_mix_flagged_share'])}): firing before the switch: {b['firing_before_switch'] or 'never'}; "
        f"**fires {b['minutes_from_switch_to_fire']} min after the switch** (first firing eval at minute "
        f"{b['first_firing_min']}).",
        "", "## Analytic expectation from the rule's bound", "",
        f"- n = {ana['items_per_hour']:.0f} items/h; bound = {ana['bound_flagged_per_hour']:.1f} flagged/h "
        f"(share {f(ana['bound_share'])}).",
        f"- ID share {f(sim['id_flagged_share'])} is z = {ana['z_of_measured_id_share']:.2f} against p0u; "
        f"P(hour's count > bound) per evaluation: {ana['p_exceed_per_eval_measured_id_share']:.3g} at the measured "
        f"ID share, {ana['p_exceed_per_eval_at_design_p0']:.3g} at the design p0, "
        f"P(Z>4) = {ana['p_exceed_at_p0_upper_normal']:.3g} if the true rate were p0u "
        f"(~{ana['expected_exceed_minutes_per_day_measured']:.3g} exceeding minutes/day at the measured share, "
        f"before `for: 10m`).",
        f"- With the OOD mix, the expected count crosses the bound after {ana['ood_minutes_to_cross']} min of "
        f"OOD traffic in the 1h window; + `for: 10m` -> expected fire at ~{ana['expected_minutes_to_fire']} min. "
        f"Smallest hourly volume at which this mix pages at all: {ana['min_items_per_hour_for_ood_share_to_page']} "
        f"items/h.",
        "", "## Sensitivity (same rules, promtool; analytic expected fire = OOD minutes to cross the bound + 10)", "",
        "| scenario | items/h | ID share | mix share | bound share | false pages / 24 h | fire after switch (min) "
        "| analytic (min) | P(exceed) per eval, ID |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in [sim, *r["sensitivity"]]:
        an = c["analytic"]
        lines.append(f"| {c['name']} | {an['items_per_hour']:.0f} | {f(c['id_flagged_share'])} "
                     f"| {f(c['ood_mix_flagged_share'])} | {f(an['bound_share'])} "
                     f"| {c['id_24h']['false_pages_per_day']:g} "
                     f"| {c['shift']['minutes_from_switch_to_fire']} | {an['expected_minutes_to_fire']} "
                     f"| {an['p_exceed_per_eval_measured_id_share']:.2g} |")
    lines += [
        "", f"Wall time {r['wall_s']:.0f} s (promtool {a['promtool_s']:.1f} s + {b['promtool_s']:.1f} s).", "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
