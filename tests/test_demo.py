import os
import socket
import subprocess
from pathlib import Path

from oodguard.cli import main
from oodguard.validate_repo import validate_repository

ROOT = Path(__file__).resolve().parents[1]


def test_demo_command_builds_a_valid_repository_and_prints_the_evaluation(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--demo", "digits", "--repository", str(tmp_path / "repo")]) == 0
    out = capsys.readouterr().out
    assert "AUROC digits 8-9" in out and "AUROC uniform noise" in out
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in out.splitlines()
            if line.split() and line.split()[0] in {"sisom", "sisome", "energy", "msp", "maxlogit", "knn", "cluster", "gradnorm",
                                                    "fused"}}
    assert len(rows) == 9
    assert rows["sisome"][0] > 85 and rows["energy"][0] > 85  # AUROC (%) for the unknown digits 8-9
    assert all(values[2] > 70 for values in rows.values())  # every score sees uniform noise as OOD
    assert validate_repository(tmp_path / "repo") == []
    assert (tmp_path / "runs" / "digits-demo" / "checkpoint.pt").exists()


def test_demo_script_leaves_no_gateway_behind_when_its_client_fails(tmp_path):
    """scripts/demo.sh in a checkout whose gateway demands a token the demo client does not send: the client
    fails, the script exits non-zero, and its EXIT trap stops the gateway (the port is free again)."""
    for name in ("scripts", ".venv", "pyproject.toml"):  # a checkout that shares this one's code and venv
        (tmp_path / name).symlink_to(ROOT / name)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "LISTEN": f"127.0.0.1:{port}", "OODGUARD_AUTH_TOKEN": "a-token-the-client-lacks"}
    done = subprocess.run(["bash", str(tmp_path / "scripts" / "demo.sh")], capture_output=True, text=True, env=env,
                          timeout=120, cwd=tmp_path)  # an orphaned gateway would hold the pipes open: a timeout
    assert done.returncode != 0 and "UNAUTHENTICATED" in done.stderr, done.stdout[-2000:] + done.stderr[-2000:]
    with socket.socket() as s:  # bindable again: nothing listens there any more
        s.bind(("127.0.0.1", port))
