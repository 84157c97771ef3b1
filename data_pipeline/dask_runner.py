"""Beam's DaskRunner made exact for multi-output jobs: each output of a ParDo kept apart, nothing lost.

Beam's own ``apache_beam.runners.dask.dask_runner.DaskRunner`` (2.55 to 2.77 at least) translates a
pipeline into Dask bags but (1) hands every output of a multi-output ParDo (``with_outputs``) to every
consumer, (2) drops what ``finish_bundle`` emits, and (3) evaluates a side input by computing its bag
again inside each consuming task. This runner keeps Beam's translations of Create, GroupByKey and
Flatten and replaces the ParDo translation and the graph walk:

- a ParDo's bundle emits ``(tag, value)`` pairs, and each output PCollection is the bag of its tag;
- outputs are collected after ``finish_bundle``;
- a side input is a whole-bag ``Delayed`` the consuming bag depends on, computed once in the same graph;
- every PCollection nobody consumes is computed (not only the last transform's);
- a Reshuffle of fewer partitions than wanted (a few input files) spreads its records round-robin
  over them (Beam's translation is a no-op);
- without ``--dask_npartitions`` / ``--dask_partition_size`` the Create transforms are cut into two
  partitions per worker thread of the cluster, so reading is spread over the workers.

Select it with ``--runner DaskRunner`` (``data_pipeline.runners`` maps the name).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import dask.bag as db
from apache_beam import DoFn, ParDo, pvalue
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pipeline import AppliedPTransform, Pipeline, PipelineVisitor
from apache_beam.runners.common import (
    DoFnContext,
    DoFnInvoker,
    DoFnSignature,
    Receiver,
    _OutputHandler,
)
from apache_beam.runners.dask import dask_runner as beam_dask
from apache_beam.runners.dask.overrides import _Reshuffle, dask_overrides
from apache_beam.runners.dask.transform_evaluator import TRANSLATIONS, Flatten, NoOp, get_windowed_value
from apache_beam.transforms.sideinputs import SideInputMap
from apache_beam.utils.windowed_value import WindowedValue

# Partitions per worker thread for the Create transforms when the user sets no partitioning.
PARTITIONS_PER_THREAD = 2


class _TaggedReceiver(Receiver):
    """Appends ``(tag, value)`` for each output of one tag (None: the main output)."""

    def __init__(self, tag: str | None, outputs: list[tuple[str | None, Any]]) -> None:
        self.tag = tag
        self.outputs = outputs

    def receive(self, windowed_value: WindowedValue) -> None:
        self.outputs.append((self.tag, windowed_value.value))


class _Receivers(dict):
    """Receivers by output tag, made on first use; all append to one bundle's output list."""

    def __init__(self, outputs: list[tuple[str | None, Any]]) -> None:
        super().__init__()
        self.outputs = outputs

    def __missing__(self, tag: str | None) -> _TaggedReceiver:
        self[tag] = _TaggedReceiver(tag, self.outputs)
        return self[tag]


@dataclasses.dataclass(frozen=True)
class _ParDoSpec:
    """What a bundle needs to run one ParDo; pickled into the Dask tasks."""

    label: str
    fn: DoFn
    args: list[Any]
    kwargs: dict[str, Any]
    window_fn: Any
    side_views: list[tuple[type, Any, Any]]  # (view class, view options, window mapping fn)


def _run_bundle(items: Iterable[Any], spec: _ParDoSpec, *side_values: list[Any]) -> list[tuple[Any, Any]]:
    """Run ``spec``'s DoFn over one partition: its ``(tag, value)`` outputs, finish_bundle's included."""
    side_inputs = [
        SideInputMap(view_class, options, [get_windowed_value(v, window_fn) for v in values])
        for (view_class, options, window_fn), values in zip(spec.side_views, side_values)
    ]
    outputs: list[tuple[str | None, Any]] = []
    receivers = _Receivers(outputs)
    handler = _OutputHandler(
        window_fn=spec.window_fn,
        main_receivers=receivers[None],
        tagged_receivers=receivers,
        per_element_output_counter=None,
        output_batch_converter=None,
        process_yields_batches=False,
        process_batch_yields_elements=False,
    )
    invoker = DoFnInvoker.create_invoker(
        DoFnSignature(spec.fn),
        handler,
        context=DoFnContext(spec.label, state=None),
        side_inputs=side_inputs or None,
        input_args=list(spec.args),
        input_kwargs=dict(spec.kwargs),
        user_state_context=None,
        bundle_finalizer_param=DoFn.BundleFinalizerParam(),
    )
    invoker.invoke_setup()
    invoker.invoke_start_bundle()
    for item in items:
        invoker.invoke_process(get_windowed_value(item, spec.window_fn))
    invoker.invoke_finish_bundle()
    invoker.invoke_teardown()
    return outputs


def _concatenated(parts: Sequence[Iterable[Any]]) -> list[Any]:
    return [value for part in parts for value in part]


def _whole(bag: db.Bag) -> Any:
    """``bag`` as one Delayed list of all its values: a side input's contents.

    Built on the bag's own, unoptimised partition keys: a ``reduction`` Item would carry a fused
    copy of the bag's graph, and every stage upstream would run once more per side input.
    """
    import dask

    return dask.delayed(_concatenated)(bag.to_delayed(optimize_graph=False))


def _numbered(values: Iterable[Any]) -> list[tuple[int, Any]]:
    return list(enumerate(values))


def _group_values(group: tuple[int, list[tuple[int, Any]]]) -> list[Any]:
    return [value for _, value in group[1]]


def _slot(item: tuple[int, Any], slots: int) -> int:
    return item[0] % slots


def _spread(bag: db.Bag, npartitions: int) -> db.Bag:
    """``bag``'s values dealt round-robin over ``npartitions`` partitions: each partition's run of
    records (one input file's documents) ends up on every worker."""
    return (
        bag.map_partitions(_numbered)
        .groupby(functools.partial(_slot, slots=npartitions), npartitions=npartitions)
        .map(_group_values)
        .flatten()
    )


def _has_tag(item: tuple[Any, Any], tag: str | None) -> bool:
    return item[0] == tag


def _value(item: tuple[Any, Any]) -> Any:
    return item[1]


class _BagVisitor(PipelineVisitor):
    """Builds a Dask bag per PCollection, walking the (already overridden) pipeline's leaf transforms."""

    def __init__(self, bag_kwargs: dict[str, Any]) -> None:
        self.bag_kwargs = bag_kwargs
        self.bags: dict[pvalue.PValue, db.Bag | None] = {}
        self.consumed: set[pvalue.PValue] = set()

    def visit_transform(self, node: AppliedPTransform) -> None:
        inputs = [value for value in node.inputs if not isinstance(value, pvalue.PBegin)]
        self.consumed.update(inputs)
        self.consumed.update(side.pvalue for side in node.side_inputs)
        input_bags = [self.bags.get(value) for value in inputs]
        if type(node.transform) is ParDo:  # exact class: Beam's GroupAlsoByWindow subclass is a no-op
            self._add_pardo(node, input_bags[0])
            return
        wanted = self.bag_kwargs.get("npartitions") or 0
        if type(node.transform) is _Reshuffle and input_bags[0].npartitions < wanted:
            self.bags[node.outputs[None]] = _spread(input_bags[0], wanted)
            return
        op = TRANSLATIONS.get(type(node.transform), NoOp)(node, bag_kwargs=self.bag_kwargs)
        if isinstance(op, Flatten):
            bag = op.apply(input_bag=input_bags)
        else:
            bag = op.apply(input_bag=input_bags[0] if input_bags else None)
        for output in node.outputs.values():
            self.bags[output] = bag

    def _add_pardo(self, node: AppliedPTransform, input_bag: db.Bag) -> None:
        transform = node.transform
        args, kwargs = transform.raw_side_inputs
        main_input = next(iter(node.main_inputs.values()))
        spec = _ParDoSpec(
            label=transform.label,
            fn=transform.fn,
            args=list(args),
            kwargs=dict(kwargs),
            window_fn=main_input.windowing.windowfn if hasattr(main_input, "windowing") else None,
            side_views=[
                (type(side), side._view_options(), side._window_mapping_fn) for side in node.side_inputs
            ],
        )
        sides = [_whole(self.bags[side.pvalue]) for side in node.side_inputs]
        tagged = input_bag.map_partitions(_run_bundle, spec, *sides)
        for tag, output in node.outputs.items():
            self.bags[output] = tagged.filter(functools.partial(_has_tag, tag=tag)).map(_value)

    def sinks(self) -> list[db.Bag]:
        """The bags of the PCollections no transform consumes: computing them runs the whole job."""
        return [bag for value, bag in self.bags.items() if value not in self.consumed and bag is not None]


class _DaskResult(beam_dask.DaskRunnerResult):
    """Beam's Dask result, closing its client (and a local cluster it started) when the job ends."""

    def wait_until_finish(self, duration: int | None = None) -> str:
        try:
            return super().wait_until_finish(duration)
        finally:
            if duration is None:
                self.client.close()


def _partitioning(bag_kwargs: dict[str, Any], threads: int) -> dict[str, Any]:
    """``bag_kwargs`` or, when they set no partitioning, ``PARTITIONS_PER_THREAD`` per worker thread
    (the output bytes never depend on it)."""
    if bag_kwargs:
        return bag_kwargs
    # No worker has joined yet: Beam's default partition size.
    return {"npartitions": PARTITIONS_PER_THREAD * threads} if threads else {}


def _connect(dask_options: dict[str, Any]) -> tuple[Any, int]:
    """A client of the cluster the options name (a new local one without an address), its thread
    count; the cluster's own start-up and shut-down chatter is kept below WARNING."""
    import dask.distributed as ddist

    logging.getLogger("distributed").setLevel(logging.WARNING)
    client = ddist.Client(**dask_options)
    workers = client.scheduler_info()["workers"].values()
    threads = sum(worker["nthreads"] for worker in workers)
    print(
        f"pretrain: Dask cluster {client.scheduler.address}: {len(workers)} workers, {threads} threads",
        file=sys.stderr,
    )
    return client, threads


class DaskRunner(beam_dask.DaskRunner):
    """Runs a pipeline on a Dask cluster: ``--dask_client_address`` or, without it, a local cluster."""

    def run_pipeline(self, pipeline: Pipeline, options: PipelineOptions) -> beam_dask.DaskRunnerResult:
        dask_options = options.view_as(beam_dask.DaskOptions).get_all_options(
            drop_default=True, current_only=True
        )
        bag_kwargs = beam_dask.DaskOptions._extract_bag_kwargs(dask_options)
        client, threads = _connect(dask_options)
        pipeline.replace_all(dask_overrides())
        visitor = _BagVisitor(_partitioning(bag_kwargs, threads))
        pipeline.visit(visitor)
        futures = client.compute([bag.count() for bag in visitor.sinks()])
        return _DaskResult(client, futures)
