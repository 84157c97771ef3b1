"""`prepare text` on a real distributed engine (a Dask cluster of worker processes), runner options,
and the package a cluster's workers are sent."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import uuid
import venv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pvalue import AsList, AsSingleton, TaggedOutput
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue
from test_pipeline import prepare, train_tokenizer, write_corpus

from data_pipeline.command_common import beam_arguments, recorded_options
from data_pipeline.errors import UserError
from data_pipeline.formats.location import file_sha256
from data_pipeline.runners import DASK_RUNNER, staging_arguments, worker_count

distributed = pytest.importorskip("distributed")

DIRECT = ["--", "--direct_running_mode=in_memory", "--direct_num_workers=1"]


def digests(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): file_sha256(str(path))
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def manifest_without_runner(directory: Path) -> dict[str, object]:
    manifest = json.loads((directory / "manifest.json").read_text())
    beam_options = manifest["options"]["beam"]
    manifest["options"]["beam"] = [arg for arg in beam_options if not arg.startswith("--runner=")]
    return manifest


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    with distributed.LocalCluster(
        n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None
    ) as local_cluster:
        yield local_cluster


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distributed")
    write_corpus(root / "corpus")
    model = train_tokenizer(root / "corpus", root / "tok")
    assert prepare(root / "corpus", model, root / "direct", *DIRECT) == 0
    return {"root": root, "corpus": root / "corpus", "model": model}


def test_dask_cluster_writes_the_bytes_of_the_local_run(corpus: dict[str, Path], cluster: Any) -> None:
    root = corpus["root"]
    address = cluster.scheduler_address
    extra = ["--", "--runner", "DaskRunner", "--dask_client_address", address]
    assert prepare(corpus["corpus"], corpus["model"], root / "dask", *extra) == 0
    direct, dask = digests(root / "direct"), digests(root / "dask")
    assert sorted(direct) == sorted(dask) and any(name.startswith("train-") for name in direct)
    # Every shard, reject file and the tokenizer copy byte for byte.
    assert {k: v for k, v in dask.items() if k != "manifest.json"} == {
        k: v for k, v in direct.items() if k != "manifest.json"
    }
    # The manifest differs only by the runner it records; the cluster address is execution-only.
    assert manifest_without_runner(root / "dask") == manifest_without_runner(root / "direct")
    recorded = json.loads((root / "dask" / "manifest.json").read_text())["options"]["beam"]
    assert recorded == [f"--runner={DASK_RUNNER}"]
    assert len(cluster.workers) == 2


class _SplitFn(beam.DoFn):
    """Evens to the main output, odds tagged, and each bundle's size from finish_bundle (negated);
    every bundle leaves a marker file, so a stage that runs twice shows."""

    def __init__(self, markers: str) -> None:
        self.markers = markers

    def start_bundle(self) -> None:
        self.seen = 0
        Path(self.markers, uuid.uuid4().hex).touch()

    def process(self, value: int) -> Iterator[Any]:
        self.seen += 1
        yield TaggedOutput("odd", value) if value % 2 else value

    def finish_bundle(self) -> Iterator[WindowedValue]:
        yield WindowedValue(-self.seen, 0, [GlobalWindow()])


def test_dask_runner_keeps_tagged_outputs_apart(tmp_path: Path, cluster: Any) -> None:
    # Beam's own DaskRunner hands every tagged output to every consumer, drops finish_bundle's
    # output, and reruns a stage for each side input read from it.
    out, markers = tmp_path / "seen.json", tmp_path / "bundles"
    markers.mkdir()

    def record(_: None, even: list[int], odd: list[int], total: int) -> None:
        out.write_text(json.dumps({"even": sorted(even), "odd": sorted(odd), "total": total}))

    address = cluster.scheduler_address
    options = PipelineOptions(
        [f"--runner={DASK_RUNNER}", f"--dask_client_address={address}", "--dask_npartitions=3"]
    )
    with beam.Pipeline(options=options) as pipeline:
        split = (
            pipeline
            | beam.Create(range(12))
            | beam.ParDo(_SplitFn(str(markers))).with_outputs("odd", main="even")
        )
        total = split.odd | beam.CombineGlobally(sum)
        keyed = split.even | beam.Map(lambda value: (value % 3, value)) | beam.GroupByKey()
        _ = keyed | "Sizes" >> beam.Map(lambda group, odd: len(group[1]) + len(odd), AsList(split.odd))
        _ = pipeline | "Once" >> beam.Create([None]) | beam.Map(
            record, AsList(split.even), AsList(split.odd), AsSingleton(total)
        )
    seen = json.loads(out.read_text())
    assert seen["odd"] == [1, 3, 5, 7, 9, 11] and seen["total"] == 36
    assert [value for value in seen["even"] if value >= 0] == [0, 2, 4, 6, 8, 10]
    bundle_sizes = [-value for value in seen["even"] if value < 0]
    assert sum(bundle_sizes) == 12 and len(bundle_sizes) == 3
    assert len(list(markers.iterdir())) == 3  # one run per partition, whatever reads the outputs


# --- runner options -------------------------------------------------------------------------------------


def test_dask_runner_short_name_and_space_separated_values() -> None:
    args = beam_arguments(["--runner", "DaskRunner", "--dask_client_address", "tcp://h:8786"], 8)
    assert args == [f"--runner={DASK_RUNNER}", "--dask_client_address=tcp://h:8786"]
    assert beam_arguments(["--runner=apache_beam.runners.dask.dask_runner.DaskRunner"], 8) == [
        f"--runner={DASK_RUNNER}"
    ]


def test_dask_options_for_another_runner_are_user_errors(tmp_path: Path, capsys) -> None:
    with pytest.raises(UserError, match=r"--dask_client_address: only valid with --runner DaskRunner"):
        beam_arguments(["--dask_client_address=tcp://h:8786"], 2)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("text")
    model = tmp_path / "tok" / "spm.model"
    assert prepare(tmp_path / "in", model, tmp_path / "out", "--", "--dask_npartitions=4") == 2
    assert "--dask_npartitions: only valid with --runner DaskRunner" in capsys.readouterr().err


def test_unknown_runner_is_a_user_error_naming_the_option() -> None:
    from data_pipeline.beam_common import make_pipeline

    with pytest.raises(UserError, match=r"--runner NoSuchRunner: "):
        make_pipeline(["--runner=NoSuchRunner", "--extra_package=x.whl"])


def test_recorded_options_leave_out_cluster_settings() -> None:
    args = argparse.Namespace(inputs=["x"], output="o", passthrough=[], seed=1)
    beam_args = [f"--runner={DASK_RUNNER}", "--dask_client_address=tcp://h:8786", "--dask_npartitions=8",
                 "--num_workers=4", "--max_num_workers=9", "--extra_package=p.whl", "--project=p"]
    assert recorded_options(args, beam_args)["beam"] == [f"--runner={DASK_RUNNER}", "--project=p"]


def test_worker_count_comes_from_the_options() -> None:
    def count(*args: str) -> int | None:
        return worker_count(PipelineOptions(list(args)))

    assert count("--runner=DirectRunner", "--direct_num_workers=3") == 3
    assert count("--runner=DirectRunner") == 1
    assert count("--runner=DataflowRunner", "--num_workers=4", "--max_num_workers=20") == 20
    assert count("--runner=DataflowRunner", "--num_workers=4") == 4
    assert count("--runner=FlinkRunner", "--parallelism=6") == 6
    assert count(f"--runner={DASK_RUNNER}") is None  # the cluster's size: the job balances itself


def test_staging_only_for_cluster_runners_without_user_packages() -> None:
    assert staging_arguments(["--runner=DirectRunner"]) == []
    assert staging_arguments([f"--runner={DASK_RUNNER}"]) == []
    for given in ("--setup_file=./setup.py", "--extra_package=x.whl", "--extra_packages=x.whl"):
        assert staging_arguments(["--runner=FlinkRunner", given]) == []


def test_staged_wheel_installs_and_imports_the_dofns(tmp_path: Path) -> None:
    staged = staging_arguments(["--runner=FlinkRunner", "--flink_master=h:8081"])
    assert len(staged) == 1 and staged[0].startswith("--extra_package=") and staged[0].endswith(".whl")
    wheel = Path(staged[0].split("=", 1)[1])
    environment = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(environment)
    python = environment / "bin" / "python"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
               "--no-index", str(wheel)]
    done = subprocess.run(install, capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr
    check = (
        "import data_pipeline, sys; from data_pipeline.text.pipeline import _BuildBucketFn, "
        "_TokenizeFn, _WriteShardFn; from data_pipeline.text.reading import _ReadFileFn; "
        "from data_pipeline.dask_runner import DaskRunner; "
        "print(data_pipeline.__file__)"
    )
    done = subprocess.run([str(python), "-c", check], capture_output=True, text=True, env=env, cwd=tmp_path,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).resolve().is_relative_to(environment.resolve())
    shutil.rmtree(wheel.parent)
