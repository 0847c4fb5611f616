"""The `lightning-influence` command line: help, the README's commands exactly as written, the presets, analyze."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import tomllib
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_influence import GradientStore
from lightning_influence.cli import STORE_CONFIG, main, per_sample_losses, rebuild_data, rebuild_model, run
from lightning_influence.errors import StoreError

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "callbacks").glob("*.yaml"))
#: Appended to each preset's documented command so the test stays small (later flags override earlier ones).
TINY = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]

#: A small digits VAE fitted by the command line (the tests add the trainer flags they need).
SMALL_FIT = [
    "fit",
    "--model",
    "lightning_influence.models.MLPVAE",
    "--model.hidden_dim",
    "16",
    "--data",
    "lightning_influence.data.DigitsDataModule",
]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-influence"])


def run_cli(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-m", "lightning_influence", *args],
        cwd=cwd,
        env=env,
        text=True,
        capture_output=True,
        timeout=600,
    )
    if check and out.returncode != 0:
        raise AssertionError(f"lightning-influence {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return out


def readme_commands() -> list[str]:
    """Every `lightning-influence ...` command in README.md's bash blocks, continuation lines joined."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("lightning-influence "):
                commands.append(" ".join(line.split()))
    return commands


def test_console_script_is_declared():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["lightning-influence"] == "lightning_influence.cli:main"


def test_help_prints_the_documented_arguments(tmp_path):
    top = run_cli("--help", cwd=tmp_path).stdout
    for sub in ("fit", "analyze", "record"):
        assert re.search(rf"^\s+{sub}\s", top, flags=re.M), sub
    fit = run_cli("fit", "--help", cwd=tmp_path).stdout
    for arg in ("--model", "--data", "--config", "--print_config", "--trainer.max_epochs", "--trainer.callbacks"):
        assert arg in fit, arg
    analyze = run_cli("analyze", "--help", cwd=tmp_path).stdout
    for arg in ("store", "--model", "--data", "--k", "--queries", "--logdir", "--measurement", "--split", "--engine"):
        assert arg in analyze, arg
    record = run_cli("record", "--help", cwd=tmp_path).stdout
    for arg in (
        "--ckpt",
        "--model",
        "--data",
        "--dirpath",
        "--projection_dim",
        "--projection_kind",
        "--engine",
        "--factored_storage",
    ):
        assert arg in record, arg


@pytest.mark.slow
def test_readme_commands_run_exactly_as_written(tmp_path):
    commands = readme_commands()
    assert len(commands) >= 5 and any(c.startswith("lightning-influence record") for c in commands)
    shutil.copytree(ROOT / "callbacks", tmp_path / "callbacks")
    script = 'lightning-influence() { "$PY" -m lightning_influence "$@"; }\nset -e\n' + "\n".join(commands) + "\n"
    env = {**os.environ, "PY": sys.executable, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, text=True, capture_output=True, timeout=900)
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    assert "analyze it: lightning-influence analyze runs/influence" in out.stdout
    # the quick start: a store from `fit`, views and CSVs from `analyze`
    assert len(GradientStore(tmp_path / "runs" / "influence")) == 3
    analysis = tmp_path / "runs" / "analysis"
    rows = list(csv.DictReader(open(analysis / "topk.csv")))
    assert len(rows) == 4 * 8 * 2 and {r["kind"] for r in rows} == {"proponent", "opponent"}
    assert all(r["train_label"] != "" and r["query_label"] != "" for r in rows)
    self_rows = list(csv.DictReader(open(analysis / "self_influence.csv")))
    assert len(self_rows) == GradientStore(tmp_path / "runs" / "influence").n_samples
    assert float(self_rows[0]["self_influence"]) >= float(self_rows[-1]["self_influence"]) > 0
    acc = EventAccumulator(str(analysis), size_guidance={"images": 0})
    acc.Reload()
    assert {f"influence/query_{q}" for q in range(4)} | {"influence/highest_self_influence"} <= set(
        acc.Tags()["images"]
    )
    # post hoc: a store from the three saved checkpoints, analysed
    posthoc = GradientStore(tmp_path / "runs" / "posthoc")
    assert [c.step for c in posthoc.checkpoints] == [20, 40]
    assert (tmp_path / "runs" / "posthoc_analysis" / "topk.csv").is_file()


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_names_a_command_that_works(preset, tmp_path, monkeypatch, capsys):
    use = [line for line in preset.read_text().splitlines() if line.startswith("# Use: ")]
    assert len(use) == 1, f"{preset.name} must name its command in a '# Use: ' comment"
    command = use[0][len("# Use: ") :].split()
    assert command[:2] == ["lightning-influence", "fit"]
    shutil.copytree(ROOT / "callbacks", tmp_path / "callbacks")
    monkeypatch.chdir(tmp_path)
    cli = run([*command[1:], *TINY])
    recorders = cli.recorders()
    assert len(recorders) == 1
    store = GradientStore(recorders[0].store_path)
    assert len(store) >= 1 and (store.path / STORE_CONFIG).is_file()
    shown = Path(store.path).resolve().relative_to(Path.cwd().resolve())  # printed relative to the working directory
    assert f"analyze it: lightning-influence analyze {shown}" in capsys.readouterr().out


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_store")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        run([*SMALL_FIT, "--trainer.logger=false", *TINY, "--trainer.max_epochs=2"])
    finally:
        os.chdir(cwd)
    return root / "influence_store"


def _copy_without_config(store: Path, dest: Path) -> Path:
    """A copy of the store that says nothing about its model: no saved config, no class in the manifest."""
    shutil.copytree(store, dest)
    (dest / STORE_CONFIG).unlink()
    manifest = json.loads((dest / "manifest.json").read_text())
    for key in ("model_class", "hparams"):
        manifest["extra"].pop(key, None)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def test_analyze_rebuilds_the_model_from_the_manifest(small_store, tmp_path, capsys):
    store = _copy_without_config(small_store, tmp_path / "store")
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["extra"]["model_class"] = "lightning_influence.models.vae.MLPVAE"
    manifest["extra"]["hparams"] = {"hidden_dim": 16}
    (store / "manifest.json").write_text(json.dumps(manifest))
    out = run(
        [
            "analyze",
            str(store),
            "--data",
            "lightning_influence.data.DigitsDataModule",
            "--k",
            "3",
            "--queries",
            "2",
            "--logdir",
            str(tmp_path / "a"),
            "--progress",
            "false",
        ]
    )
    assert out["topk"].is_file() and len(list(csv.DictReader(open(out["topk"])))) == 2 * 3 * 2
    assert str(tmp_path / "a" / "self_influence.csv") in capsys.readouterr().out
    assert (tmp_path / "a" / "projector_config.pbtxt").is_file()  # the embedding projector, coloured by self-influence
    (metadata,) = (tmp_path / "a").rglob("metadata.tsv")
    lines = metadata.read_text().splitlines()
    assert lines[0].split("\t") == ["label", "self_influence", "self_influence_decile"]
    assert len(lines) == 1 + GradientStore(store).n_samples
    assert len(list((tmp_path / "a").rglob("sprite.png"))) == 1


def test_analyze_explains_what_is_missing(small_store, tmp_path):
    store = _copy_without_config(small_store, tmp_path / "store")
    with pytest.raises(ValueError, match="Pass --model CLASS"):
        run(["analyze", str(store), "--data", "lightning_influence.data.DigitsDataModule"])
    with pytest.raises(ValueError, match="pass --data CLASS"):
        run(["analyze", str(store), "--model", "lightning_influence.models.MLPVAE", "--model.hidden_dim", "16"])
    with pytest.raises(ValueError, match="does not match the store"):
        run(
            [
                "analyze",
                str(store),
                "--model",
                "lightning_influence.models.MLPVAE",
                "--data",
                "lightning_influence.data.DigitsDataModule",
            ]
        )  # hidden_dim 128, recorded 16


def test_analyze_with_a_measurement_from_an_import_path(small_store, tmp_path, monkeypatch):
    (tmp_path / "my_questions.py").write_text(
        "def latent_position(module, batch):\n    mu, _ = module.encode(batch[0])\n    return mu[:, 0]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    plain = run(
        [
            "analyze",
            str(small_store),
            "--k",
            "2",
            "--queries",
            "2",
            "--logdir",
            str(tmp_path / "p"),
            "--progress",
            "false",
        ]
    )
    cross = run(
        [
            "analyze",
            str(small_store),
            "--k",
            "2",
            "--queries",
            "2",
            "--logdir",
            str(tmp_path / "c"),
            "--measurement",
            "my_questions.latent_position",
            "--progress",
            "false",
        ]
    )
    assert plain["topk"].read_text() != cross["topk"].read_text()


def test_the_console_entry_point_exits_with_status_zero(small_store, tmp_path):
    """The installed script runs ``sys.exit(main())``: a successful command must return 0, not its result."""
    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "lightning-influence"]
    assert script.value == "lightning_influence.cli:main" and script.load() is main
    args = ["analyze", str(small_store), "--k", "2", "--queries", "1", "--logdir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(main(args))
    assert exit_info.value.code == 0
    assert (tmp_path / "out" / "topk.csv").is_file()


def test_a_store_the_command_line_wrote_can_be_overwritten_resumed_and_recorded_again(tmp_path, monkeypatch):
    """The config saved beside the manifest belongs to the store: it neither blocks the store nor outlives it."""
    monkeypatch.chdir(tmp_path)
    base = [
        *SMALL_FIT,
        "--config",
        str(ROOT / "callbacks" / "influence_recorder.yaml"),
        "--trainer.logger=false",
        *TINY,
    ]
    ckpts = [
        "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.dirpath=ck",
        "--trainer.callbacks.save_top_k=-1",
    ]
    first = GradientStore(run([*base, *ckpts]).recorders()[0].store_path)
    assert (first.path / STORE_CONFIG).is_file()
    ckpt = sorted((tmp_path / "ck").glob("*.ckpt"))[-1]
    resumed = GradientStore(run([*base, "--trainer.max_epochs=2", "--ckpt_path", str(ckpt)]).recorders()[0].store_path)
    assert resumed.run_id == first.run_id and len(resumed) == 2
    again = GradientStore(run([*base, "--trainer.callbacks.overwrite=true"]).recorders()[0].store_path)
    assert again.run_id != first.run_id and len(again) == 1 and (again.path / STORE_CONFIG).is_file()
    record = ["record", "--ckpt", str(ckpt), "--model", "lightning_influence.models.MLPVAE"]
    record += ["--data", "lightning_influence.data.DigitsDataModule", "--dirpath", "posthoc"]
    run(record)
    run([*record, "--overwrite", "true"])
    assert len(GradientStore(tmp_path / "posthoc")) == 1
    # Where there is no store, a file of that name is someone else's: refused, and kept.
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / STORE_CONFIG).write_text("trainer: {}\n")
    with pytest.raises(StoreError, match=r"did not write \(\['lightning_config.yaml'\]\)"):
        run([*record[:-1], "theirs", "--overwrite", "true"])
    assert (tmp_path / "theirs" / STORE_CONFIG).read_text() == "trainer: {}\n"


def test_analyze_refuses_counts_by_their_flag(small_store, tmp_path):
    for flag, value, message in (
        ("--k", "0", "--k must be a positive integer, got 0"),
        ("--k", "100000", r"--k 100000 exceeds the \d+ training samples"),
        ("--queries", "0", "--queries must be a positive integer, got 0"),
        ("--n_self", "-1", "--n_self must be a positive integer, got -1"),
    ):
        with pytest.raises(ValueError, match=message):
            run(["analyze", str(small_store), flag, value, "--logdir", str(tmp_path / "x"), "--progress", "false"])
        assert not (tmp_path / "x").exists(), "refused before anything was computed or written"


def test_analyze_with_the_recorded_model_class_keeps_the_stores_hyperparameters(small_store, tmp_path):
    """--model names the class; the store's hyperparameters (hidden_dim 16 here, 128 by default) still hold."""
    common = ["--k", "2", "--queries", "2", "--progress", "false", "--embedding", "false"]
    implied = run(["analyze", str(small_store), *common, "--logdir", str(tmp_path / "implied")])
    named = run(
        ["analyze", str(small_store), "--model", "lightning_influence.models.MLPVAE", *common]
        + ["--logdir", str(tmp_path / "named")]
    )
    assert named["topk"].read_text() == implied["topk"].read_text()
    with pytest.raises(ValueError, match="does not match the store"):  # an explicit init arg still wins
        run(["analyze", str(small_store), "--model", "lightning_influence.models.MLPVAE", "--model.hidden_dim", "32"])


def test_from_python_every_init_arg_given_overrides_the_stores_hyperparameters(small_store):
    store = GradientStore(small_store)  # recorded with hidden_dim=16 and the default likelihood, bernoulli
    spec = {"class_path": "lightning_influence.models.MLPVAE", "init_args": {"likelihood": "gaussian"}}
    assert rebuild_model(store, spec).hparams["likelihood"] == "gaussian"
    assert rebuild_model(store, spec).hparams["hidden_dim"] == 16  # the store's, where nothing is given
    # A value equal to the class's default is still a value given (the parser's fills are the CLI's concern).
    spec = {"class_path": "lightning_influence.models.MLPVAE", "init_args": {"hidden_dim": 128}}
    assert rebuild_model(store, spec).hparams["hidden_dim"] == 128


def test_the_loss_column_is_the_same_on_every_run(small_store):
    """The ELBO's noise is keyed by sample, as in the recorded rows, not drawn from the global RNG."""
    store = GradientStore(small_store)
    model = rebuild_model(store)
    data = rebuild_data(store)
    data.setup("fit")
    first = per_sample_losses(model, store, data.train_dataloader().dataset, 64)
    torch.manual_seed(123)
    torch.testing.assert_close(
        per_sample_losses(model, store, data.train_dataloader().dataset, 64), first, rtol=0, atol=0
    )
