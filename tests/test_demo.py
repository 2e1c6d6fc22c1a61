from oodguard.cli import main
from oodguard.validate_repo import validate_repository


def test_demo_command_builds_a_valid_repository_and_prints_the_evaluation(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--demo", "digits", "--repository", str(tmp_path / "repo")]) == 0
    out = capsys.readouterr().out
    assert "AUROC digits 8-9" in out and "AUROC uniform noise" in out
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in out.splitlines()
            if line.split() and line.split()[0] in {"sisom", "sisome", "energy", "msp", "maxlogit", "knn", "cluster", "gradnorm"}}
    assert len(rows) == 8
    assert rows["sisome"][0] > 85 and rows["energy"][0] > 85  # AUROC (%) for the unknown digits 8-9
    assert all(values[2] > 70 for values in rows.values())  # every score sees uniform noise as OOD
    assert validate_repository(tmp_path / "repo") == []
    assert (tmp_path / "runs" / "digits-demo" / "checkpoint.pt").exists()
