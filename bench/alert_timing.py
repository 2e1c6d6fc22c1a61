"""The OOD-rate alerts of deploy/prometheus/rules.yml on measured traffic: false pages and time to fire.

    python bench/alert_timing.py [--repository DIR] [--duration 40] [--concurrency 4] [--rate 0]
                                 [--out runs/bench/alert-report]

The alerts: ``OODGuardFlaggedRateAboveCalibration`` (page: a 15-minute and a 5-minute window both at
>= 2 x p0, above p0u and significantly so) and ``OODGuardFlaggedRateDrift`` (ticket: 6 hours and the last
hour at >= 1.2 x p0). p0 is the calibration's false-flag rate, p0u the upper end of its 95% interval.

1. Starts a gateway (embedded backend, ``--metrics-port``) on the digits demo model (``--repository``, default
   ``model_repository/`` when it serves ``digits``, else a fresh ``oodguard export --demo digits``) and runs
   ``oodguard loadgen`` twice: held-out in-distribution digits (the training record's ``test`` split, classes
   0-7, never used for training or calibration) and the same with 20% uniform-noise requests. ``/metrics`` is
   scraped around each run: items, flagged items and the calibrated p0 gauges come from the gateway's own
   counters. The flagged share of the noise alone follows from the two (and gives the 10% mix).
2. Turns those measured shares into promtool ``input_series`` (one sample per minute, Poisson item counts and
   binomial flagged counts with a fixed seed) at 1, 10 and 100 requests/s (one image each): 24 h of
   in-distribution traffic (false pages and tickets, evaluated every 5 min); 2 h of it, then the 20% and the
   10% OOD mix (minutes to the page, evaluated every minute); 6 h of it, then a slow drift to a 7% flagged share
   for 8 h (hours to the ticket; a page there would be a false page). ``promtool test rules`` runs the real
   rules.yml; its failing eval times are the times an alert was firing.
3. Next to each measured figure, the analytic one: the per-evaluation probability that the page's long window
   exceeds its bound at the measured ID share (x 1440 evaluations a day: an upper bound of false pages per
   day), and the expected minutes to fire from the expected counts. Writes ``report.md`` + ``report.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from oodguard.clients.gateway_process import GatewayProcess

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
PAGE, TICKET = "OODGuardFlaggedRateAboveCalibration", "OODGuardFlaggedRateDrift"
#: the page's windows (minutes, burn over p0, z over n·p0, minimum items, share >= p0u) and `for:` (rules.yml)
PAGE_LONG, PAGE_SHORT, PAGE_FOR = (15, 2.0, 4.0, 100, True), (5, 2.0, 3.0, 0, True), 0
#: the ticket's windows and `for:`
TICKET_LONG, TICKET_SHORT, TICKET_FOR = (360, 1.2, 4.0, 1000, False), (60, 1.2, None, 0, False), 15
REQUEST_RATES = (1, 10, 100)  # requests/s, one image each
TARGETS = {"page_20pct_min": 5, "page_10pct_min": 15, "false_pages_per_day": 0}
DRIFT_SHARE = 0.07


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


def start_gateway(repository: Path, tmp: Path) -> GatewayProcess:
    """``oodguard serve`` (embedded backend, ``--metrics-port``) on free loopback ports, serving and scraped: its
    metrics port is open (which also means the calibrated p0 gauges are there: the model loaded first)."""
    return GatewayProcess(repository, ["--backend", "embedded", "--queue-path", tmp / "queue.sqlite",
                                       "--log-level", "WARNING"],
                          work=tmp, metrics=True, command=oodguard_cmd(), stop_timeout_s=20).start()


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
                    eval_minutes: list[int]) -> tuple[dict[str, list[int]], float]:
    """Per alert (page, ticket), the eval minutes (of ``eval_minutes``) at which it was firing; promtool's time."""
    iv, fv = counter_values(items, flagged)
    n = len(items) + 1
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
            "alert_rule_test": [{"eval_time": f"{m}m", "alertname": alert, "exp_alerts": []}
                                for m in eval_minutes for alert in (PAGE, TICKET)],
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
    firing = {alert: sorted({parse_duration(m) for m in re.findall(rf"alertname: {alert}, time: (\S+?),", out)})
              for alert in (PAGE, TICKET)}
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
def window_holds(n: float, flagged: float, p0: float, p0u: float, window: tuple) -> bool:
    """Whether a window with ``n`` items and ``flagged`` flagged meets its burn, z, upper-bound and count conditions."""
    _, burn, z, minimum, above_upper = window
    if n <= 0 or n < minimum:
        return False
    share = flagged / n
    return (share >= burn * p0 and (z is None or flagged - n * p0 >= z * math.sqrt(n * p0 * (1 - p0)))
            and (not above_upper or share >= p0u))


def _expected_time(items_per_min: float, share_id: float, share_new: float, p0: float, p0u: float, windows,
                   extra: int, step: int, limit: int) -> int | None:
    """Minutes after a switch from ``share_id`` to ``share_new`` until every window holds on expected counts."""
    for t in range(0, limit + 1, step):
        if all(window_holds(items_per_min * w[0], items_per_min * (min(t, w[0]) * share_new + (w[0] - min(t, w[0])) * share_id),
                            p0, p0u, w) for w in windows):
            return t + extra
    return None


def expected_minutes_to_page(items_per_min: float, share_id: float, share_mix: float, p0: float, p0u: float) -> int | None:
    return _expected_time(items_per_min, share_id, share_mix, p0, p0u, (PAGE_LONG, PAGE_SHORT), PAGE_FOR, 1, 240)


def expected_hours_to_ticket(items_per_min: float, share_id: float, share_drift: float, p0: float,
                             p0u: float) -> float | None:
    minutes = _expected_time(items_per_min, share_id, share_drift, p0, p0u, (TICKET_LONG, TICKET_SHORT), TICKET_FOR,
                             5, 24 * 60)
    return None if minutes is None else minutes / 60


def false_page_bound(items_per_min: float, share_id: float, p0: float, p0u: float) -> float:
    """Per evaluation, P(the page's long window meets its conditions) at the true share ``share_id``; times 1440
    evaluations a day it bounds the expected false pages per day from above (the short window only makes a
    page rarer)."""
    from scipy import stats

    length, burn, z, minimum, _ = PAGE_LONG
    n = round(items_per_min * length)
    if n < minimum:
        return 0.0
    threshold = max(burn * n * p0, n * p0u, n * p0 + z * math.sqrt(n * p0 * (1 - p0)))
    return float(stats.binom.sf(math.ceil(threshold) - 1, n, share_id))


def first_after(minutes: list[int], start: int) -> int | None:
    later = [m for m in minutes if m > start]
    return later[0] - start if later else None


def scenario(tmp: Path, rps: float, share_id: float, share_20: float, share_10: float, p0: float, p0u: float,
             args, rng: np.random.Generator) -> dict:
    """promtool runs at ``rps`` requests/s (one item each): 24 h of ID traffic; ID then the 20% / 10% OOD mix;
    ID then a drift to :data:`DRIFT_SHARE`; plus the analytic figures."""
    rate = rps * 60.0
    tag = f"{rps:g}rps"
    n_id = int(round(args.id_hours * 60))
    items, flagged = simulate(np.full(n_id, share_id), rate, rng)
    firing, took = promtool_firing(tmp, f"{tag}-id", items, flagged, p0, p0u, list(range(5, n_id + 1, 5)))
    out = {"requests_per_s": rps, "items_per_min": rate, "id_flagged_share": share_id,
           "id_24h": {"hours": args.id_hours, "eval_every_min": 5,
                      "false_pages": len(episodes(firing[PAGE], 5)), "false_tickets": len(episodes(firing[TICKET], 5)),
                      "false_pages_per_day": len(episodes(firing[PAGE], 5)) * 24 / args.id_hours, "promtool_s": took},
           "analytic": {"p_page_window_per_eval": false_page_bound(rate, share_id, p0, p0u),
                        "false_pages_per_day_bound": 1440 * false_page_bound(rate, share_id, p0, p0u),
                        "false_pages_per_day_bound_at_p0u": 1440 * false_page_bound(rate, p0u, p0, p0u)}}
    switch = args.shift_after_min
    for label, share in (("ood_20pct", share_20), ("ood_10pct", share_10)):
        n = switch + args.shift_tail_min
        items, flagged = simulate(np.where(np.arange(n) < switch, share_id, share), rate, rng)
        firing, took = promtool_firing(tmp, f"{tag}-{label}", items, flagged, p0, p0u, list(range(1, n + 1)))
        out[label] = {"mix_flagged_share": share, "switch_at_min": switch,
                      "pages_before_switch": [m for m in firing[PAGE] if m <= switch],
                      "minutes_to_page": first_after(firing[PAGE], switch),
                      "expected_minutes_to_page": expected_minutes_to_page(rate, share_id, share, p0, p0u),
                      "promtool_s": took}
    start, n = 6 * 60, 6 * 60 + args.drift_hours * 60
    items, flagged = simulate(np.where(np.arange(n) < start, share_id, DRIFT_SHARE), rate, rng)
    firing, took = promtool_firing(tmp, f"{tag}-drift", items, flagged, p0, p0u, list(range(5, n + 1, 5)))
    hours = first_after(firing[TICKET], start)
    out["drift"] = {"drift_share": DRIFT_SHARE, "starts_at_h": start / 60, "hours": args.drift_hours,
                    "tickets_before": [m for m in firing[TICKET] if m <= start],
                    "hours_to_ticket": None if hours is None else hours / 60,
                    "expected_hours_to_ticket": expected_hours_to_ticket(rate, share_id, DRIFT_SHARE, p0, p0u),
                    "pages": len(episodes(firing[PAGE], 5)), "promtool_s": took}
    return out


# ------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=None, help="a repository serving 'digits' (default: "
                        "model_repository/ when it does, else a fresh demo export)")
    parser.add_argument("--duration", type=float, default=40.0, help="seconds per loadgen run (default %(default)s)")
    parser.add_argument("--concurrency", type=int, default=4, help="loadgen concurrency (default %(default)s)")
    parser.add_argument("--rate", type=float, default=0.0, help="loadgen requests/s (default 0: unlimited)")
    parser.add_argument("--id-hours", type=float, default=24.0, help="hours of ID traffic simulated (default %(default)s)")
    parser.add_argument("--shift-after-min", type=int, default=120, help="ID minutes before the OOD mix (default %(default)s)")
    parser.add_argument("--shift-tail-min", type=int, default=60, help="minutes of OOD mix (default %(default)s)")
    parser.add_argument("--drift-hours", type=int, default=8, help="hours of the 7%% drift (default %(default)s)")
    parser.add_argument("--rates", default=",".join(map(str, REQUEST_RATES)), help="requests/s simulated (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "alert-report", help="output folder")
    args = parser.parse_args(argv)
    if not shutil.which("promtool"):
        print("promtool not found (scripts/setup_prometheus.sh)", file=sys.stderr)
        return 2
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="oodguard-alert-") as td:
        tmp = Path(td)
        repository, record = ensure_repository(args.repository, tmp)
        id_data, id_what = held_out_npz(record, tmp)
        gateway = start_gateway(repository, tmp)
        grpc_port, metrics_port = gateway.port, gateway.metrics_port
        try:
            loadgen(grpc_port, id_data, 3, args.concurrency, args.rate, 0.0, args.seed + 99)  # warm-up
            run_id = measured_run("in-distribution", metrics_port, grpc_port, args, id_data, 0.0)
            run_ood = measured_run("20% OOD", metrics_port, grpc_port, args, id_data, 0.2)
        finally:
            gateway.stop()
        p0, p0u = run_id["p0"], run_id["p0_upper"]
        share_id, share_20 = run_id["flagged_share"], run_ood["flagged_share"]
        share_noise = min(1.0, max(0.0, (share_20 - 0.8 * share_id) / 0.2))  # the OOD items' own flagged share
        share_10 = 0.9 * share_id + 0.1 * share_noise
        rates = [float(r) for r in args.rates.split(",")]
        scenarios = [scenario(tmp, rps, share_id, share_20, share_10, p0, p0u, args, np.random.default_rng(args.seed))
                     for rps in rates]
    checks = {
        "page_20pct_within_5_min": all((c["ood_20pct"]["minutes_to_page"] or 10**9) <= TARGETS["page_20pct_min"]
                                       for c in scenarios),
        "page_10pct_within_15_min": all((c["ood_10pct"]["minutes_to_page"] or 10**9) <= TARGETS["page_10pct_min"]
                                        for c in scenarios),
        "no_false_pages_24h": all(c["id_24h"]["false_pages"] == 0 and not c["ood_20pct"]["pages_before_switch"]
                                  and not c["ood_10pct"]["pages_before_switch"] and c["drift"]["pages"] == 0
                                  for c in scenarios),
        "drift_ticket": all(c["drift"]["hours_to_ticket"] is not None and not c["drift"]["tickets_before"]
                            for c in scenarios),
    }
    result = {
        "rules": str(RULES.relative_to(ROOT)), "alerts": [PAGE, TICKET], "seed": args.seed,
        "id_data": id_what, "repository": str(repository),
        "loadgen": {"duration_s": args.duration, "concurrency": args.concurrency, "rate": args.rate},
        "runs": [run_id, run_ood],
        "calibration": {"p0": p0, "p0_upper": p0u},
        "shares": {"id": share_id, "ood_items": share_noise, "mix_20pct": share_20, "mix_10pct": share_10},
        "scenarios": scenarios, "checks": checks, "all_met": all(checks.values()),
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
    cal, sh = r["calibration"], r["shares"]

    def f(v, spec=".4f"):
        return "-" if v is None else format(v, spec)

    lines = [
        "# OOD-rate alerts: false pages and time to fire", "",
        f"Rules: `{r['rules']}`. Page `{PAGE}`: 15 min and 5 min windows both at >= 2 x p0 and >= p0u (z >= 4 and "
        f">= 100 items over 15 min, z >= 3 over 5 min), at the first evaluation. Ticket `{TICKET}`: 6 h at >= 1.2 x p0 "
        f"(z >= 4, >= 1000 items) and the last hour at >= 1.2 x p0, not within an hour of a page, `for: 15m`. "
        f"ID data: {r['id_data']}. "
        f"Seed {r['seed']}.", "",
        "## Measured (real gateway, embedded backend, counters from /metrics)", "",
        "| run | s | req/s | items/min | flagged / items | flagged share |", "|---|---|---|---|---|---|",
    ]
    for run in (run_id, run_ood):
        lines.append(f"| {run['name']} | {run['elapsed_s']:.1f} | {run['req_per_s']:.1f} | {run['items_per_min']:.0f} "
                     f"| {run['flagged']:.0f} / {run['items']:.0f} | {f(run['flagged_share'])} |")
    lines += [
        "", f"Calibrated p0 = {f(cal['p0'])}, upper bound p0u = {f(cal['p0_upper'])}. Flagged shares used: ID "
        f"{f(sh['id'])}, the noise items themselves {f(sh['ood_items'])}, 20% mix {f(sh['mix_20pct'])}, 10% mix "
        f"{f(sh['mix_10pct'])}, drift {DRIFT_SHARE}.", "",
        "## promtool on the real rules (1-min samples, Poisson items, binomial flagged)", "",
        "| req/s | false pages in 24 h (analytic bound / day) | false tickets in 24 h | page after 20% OOD, min "
        "(expected) | page after 10% OOD, min (expected) | ticket after the 7% drift, h (expected) | pages during "
        "the drift |", "|---|---|---|---|---|---|---|",
    ]
    for c in r["scenarios"]:
        a, d = c["analytic"], c["drift"]
        lines.append(
            f"| {c['requests_per_s']:g} | {c['id_24h']['false_pages']} ({a['false_pages_per_day_bound']:.2g}) | "
            f"{c['id_24h']['false_tickets']} | {c['ood_20pct']['minutes_to_page']} ({c['ood_20pct']['expected_minutes_to_page']}) | "
            f"{c['ood_10pct']['minutes_to_page']} ({c['ood_10pct']['expected_minutes_to_page']}) | "
            f"{f(d['hours_to_ticket'], '.2f')} ({f(d['expected_hours_to_ticket'], '.2f')}) | {d['pages']} |")
    lines += ["", "Targets: " + ", ".join(f"{k} {'met' if v else '**not met**'}" for k, v in r["checks"].items()) + ".",
              "", "The analytic bound is 1440 x P(the page's 15-minute window meets its conditions) per evaluation at "
              "the measured ID share; were the true share at p0u (a calibration at the top of its interval) it would be "
              + ", ".join(f"{c['analytic']['false_pages_per_day_bound_at_p0u']:.2g}" for c in r["scenarios"])
              + " per day (by request rate).", "", f"Wall time {r['wall_s']:.0f} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
