"""`mplus session ls | show | rm | fork | check`."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from model import store as st
from model.zoo import catalog

from ..common import handle_errors, json_output, open_session, store_root
from ..errors import NotFoundError, UsageError
from ..explain import draw_map
from ..models import (
    load_bound_model,
)
from ..options import SessionNameArg, StoreOpt
from ..output import columns, emit, human_bytes, plural
from ..root import say

session_app = typer.Typer(
    help="List, show, check, remove and fork stored sessions.",
    no_args_is_help=True,
    rich_markup_mode=None,
    add_completion=False,
)


def summary(found: st.Session) -> dict[str, Any]:
    """What `session show` reports; reads the manifest and the log, never the rows."""
    meta, bound = found.manifest["state"], found.model_ref
    L, N, d = meta["memory_shape"]
    flavour = catalog.flavour(bound.get("label", ""))
    memory = {"layers": L, "short_term_rows": N, "short_term_capacity": short_term_capacity(bound, flavour, N)}
    memory |= {"hidden_size": d, "dtype": found.manifest["dtype"]}
    if "ltm" in meta:
        sizes = meta["ltm"]["sizes"]
        memory |= {"ltm_rows": sizes, "ltm_rows_min": min(sizes), "ltm_rows_max": max(sizes)}
        memory |= {"ltm_cached_rows": meta["ltm"]["cached_rows"]}
        memory |= {"ltm_entries": found.manifest["ltm"]["initial_entries"] + found.manifest["ltm"]["entries"]}
    return {
        "session": found.name,
        "model": bound,
        "label": bound.get("label", ""),
        "flavour": flavour,
        "seed": found.manifest["seed"],
        "created": found.manifest["created"],
        "updated": found.manifest["updated"],
        "commit": found.manifest["commit"],
        "injections": meta["injections"],
        "tokens": meta["tokens_injected"],
        "chunks": found.manifest["chunks"],
        "memory": memory,
        "disk_bytes": found.disk_bytes(),
        "busy": found.busy(),
        "forked_from": found.manifest.get("forked_from"),
        "partial": found.partial,
        "log": found.log(),
    }


def short_term_capacity(bound: dict[str, Any], flavour: str, rows: int) -> int | None:
    """Short-term rows per layer the model holds at most: a trained memory is always full; a training-free one
    fills up to its model's capacity (None if the model is not on this machine)."""
    if flavour == "trained":
        return rows
    cfg = catalog.model_config(bound["id"])
    return cfg.memory_rows if cfg is not None else None


def local_time(stamp: str) -> str:
    """An ISO time stamp of the store (UTC) as local time to the minute."""
    return datetime.fromisoformat(stamp).astimezone().strftime("%Y-%m-%d %H:%M")


def ltm_range(memory: dict[str, Any]) -> str:
    low, high = memory["ltm_rows_min"], memory["ltm_rows_max"]
    return f"{low:,}" if low == high else f"{low:,}\u2013{high:,}"


@session_app.command("ls")
@handle_errors
def session_ls(store: StoreOpt = None) -> None:
    """List the sessions: model, memory, injections, tokens, size on disk, last update, and whether a writer
    holds one now (busy).

    Example: mplus session ls --json
    """
    as_json = json_output()
    root = store_root(store)
    rows = []
    for name in st.list_sessions(root):
        try:
            found = st.Session.open(root, name)
            meta, bound = found.manifest["state"], found.model_ref
            rows.append(
                {
                    "session": name,
                    "model": bound["id"],
                    "kind": bound["kind"],
                    "flavour": catalog.flavour(bound.get("label", "")),
                    "injections": meta["injections"],
                    "tokens": meta["tokens_injected"],
                    "disk_bytes": found.disk_bytes(),
                    "updated": found.manifest["updated"],
                    "busy": found.busy(),
                }
            )
        except st.StoreError as e:
            rows.append({"session": name, "error": str(e)})
    if as_json:
        emit({"store": str(root), "sessions": rows})
        return
    if not rows:
        say(f"no sessions in {root}")
        return
    table = [["session", "model", "memory", "flavour", "injections", "tokens", "size", "updated", "busy"]]
    for row in rows:
        if "error" in row:
            table.append([row["session"], "damaged (see session check)", *["-"] * 7])
            continue
        counts = [f"{row['injections']:,}", f"{row['tokens']:,}", human_bytes(row["disk_bytes"])]
        table.append(
            [row["session"], row["model"], row["kind"], row["flavour"], *counts, local_time(row["updated"])]
            + ["yes" if row["busy"] else "no"]
        )
    typer.echo("\n".join(columns(table, right=(4, 5, 6))))


@session_app.command("show")
@handle_errors
def session_show(
    name: SessionNameArg,
    map_path: Annotated[
        Path | None,
        typer.Option(
            "--map",
            help="Also draw the memory's composition into this PNG: per layer, the share of its rows by the "
            "injection that wrote them, short-term and long-term side by side (loads the model).",
        ),
    ] = None,
    store: StoreOpt = None,
) -> None:
    """A session's model, counts, memory (short-term rows used of capacity, long-term rows per layer), storage
    dtype, size on disk and injection log.

    Example: mplus session show s1 --map s1.png
    """
    as_json = json_output()
    found = open_session(store, name)
    info = summary(found)
    if map_path is not None:
        if not map_path.parent.is_dir():
            raise NotFoundError(f"no directory {map_path.parent} to write {map_path.name} into: create it first")
        lm = load_bound_model(name, found.model_ref, None)
        draw_map(found.load_state(lm.initial_state), map_path, f"session {name}: {found.model_ref['id']}")
        info["map"] = str(map_path)
    if as_json:
        emit(info)
        return
    memory, bound = info["memory"], info["model"]
    capacity = memory["short_term_capacity"]
    used = f"{memory['short_term_rows']:,}" + (f" of {capacity:,}" if capacity is not None else "")
    sources = len(info["log"])
    lines = [
        f"session     {info['session']}" + (f" (forked from {info['forked_from']})" if info["forked_from"] else ""),
        f"model       {bound['id']} ({bound['kind']}, {info['flavour']}; config {bound['fingerprint']})",
        *([f"note        {info['label']}"] if info["label"] else []),
        f"storage     {memory['dtype']} rows, {human_bytes(info['disk_bytes'])} on disk",
        f"injected    {plural(info['tokens'], 'token')} in {plural(info['chunks'], 'chunk')} "
        f"from {plural(sources, 'source')}",
        f"commit      {info['commit']} ({local_time(info['updated'])})"
        + (", busy: a writer holds it" if info["busy"] else ""),
        f"seed        {info['seed']}",
        f"short-term  {used} rows per layer ({plural(memory['layers'], 'layer')} of width {memory['hidden_size']:,})",
    ]
    if "ltm_rows" in memory:
        lines.append(
            f"long-term   {ltm_range(memory)} rows per layer, {memory['ltm_cached_rows']:,} cached "
            f"(awaiting the next merge), {plural(memory['ltm_entries'], 'entry', 'entries')}"
        )
    partial = info["partial"]
    if partial:
        lines.append(
            f"partial     {partial['source']}: {partial['chunks_done']} of {plural(partial['chunks_total'], 'chunk')} "
            f"committed ({partial['tokens_done']:,} of {plural(partial['tokens_total'], 'token')}); "
            "`mplus inject ... --resume` continues it"
        )
    if info["log"]:
        log = [["injected at", "tokens", "chunks", "sha256", "source"]]
        for e in info["log"]:
            chunks = f"{e['chunks']:,}" + (f" of {e['chunks_total']:,} (partial)" if e.get("partial") else "")
            log.append([local_time(e["at"]), f"{e['tokens']:,}", chunks, e["sha256"][:12], e["source"]])
        lines += ["log", *(f"  {line}" for line in columns(log, right=(1,)))]
    typer.echo("\n".join(lines))


@session_app.command("rm")
@handle_errors
def session_rm(
    name: SessionNameArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    store: StoreOpt = None,
) -> None:
    """Remove a session.

    Example: mplus session rm s1 --yes
    """
    as_json = json_output()
    root = store_root(store)
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"pass --yes to remove session {name!r} without a prompt")
        typer.confirm(f"remove session {name!r}?", abort=True)
    st.remove_session(root, name)
    if as_json:
        emit({"removed": name})
    else:
        typer.echo(f"removed session {name!r}")


@session_app.command("fork")
@handle_errors
def session_fork(
    name: SessionNameArg,
    new_name: Annotated[str, typer.Argument(help="Name of the copy.", show_default=False)],
    store: StoreOpt = None,
) -> None:
    """Copy a session under a new name.

    Example: mplus session fork s1 s1-backup
    """
    as_json = json_output()
    forked = open_session(store, name).fork(st.check_name(new_name))
    if as_json:
        emit({"session": forked.name, "forked_from": name, "commit": forked.manifest["commit"]})
    else:
        typer.echo(f"forked session {name!r} into {forked.name!r}")


@session_app.command("check")
@handle_errors
def session_check(
    name: SessionNameArg,
    rollback: Annotated[
        bool, typer.Option(help="If the committed state is damaged, return to the newest kept commit that verifies.")
    ] = False,
    quick: Annotated[
        bool, typer.Option(help="Check the committed state only, not the kept commits a rollback may need.")
    ] = False,
    store: StoreOpt = None,
) -> None:
    """Verify every file of a session against its checksums (exit 1 if anything a session or its rollback
    needs is damaged).

    The last few commits are kept, and checked too (unless --quick): with --rollback a damaged session
    returns to the newest of them that verifies (what later commits added is lost; the command says which
    commit it returned to).

    Example: mplus session check s1 --rollback
    """
    as_json = json_output()
    root = store_root(store)
    verdicts = st.check_session(root, name, quick and not rollback)
    current, kept = verdicts[0], verdicts[1:]
    damaged_kept = [verdict for verdict in kept if verdict.problems]
    report: dict[str, Any] = {"session": name, "ok": not current.problems and not damaged_kept}
    report |= {"commit": current.commit, "quick": quick, "commits": [vars(verdict) for verdict in verdicts]}
    if rollback and current.problems:
        report["rolled_back_from"], report["commit"] = st.rollback_session(root, name)
        report["ok"] = True
    if as_json:
        emit(report)
    else:
        for problem in current.problems:
            say(f"mplus: damaged: {problem}")
        for verdict in damaged_kept:
            say(f"mplus: damaged: kept commit {verdict.commit or verdict.manifest}: {verdict.problems[0]}")
        if "rolled_back_from" in report:
            was = report["rolled_back_from"]
            typer.echo(
                f"session {name!r} rolled back from commit {was if was is not None else '?'} to commit "
                f"{report['commit']}, which verifies"
            )
        elif not current.problems:
            checked = f"{current.checked_bytes} bytes checked" + (
                ", kept commits not checked (--quick)" if quick else ""
            )
            typer.echo(f"session {name!r}: commit {current.commit} verifies ({checked})")
    if report["ok"]:
        return
    if current.problems:
        good = next((v.commit for v in kept if not v.problems), None)
        advice = f"`--rollback` returns to commit {good}" if good is not None else "no kept commit verifies"
        raise st.SessionDamaged(f"session {name!r} is damaged: {advice}")
    raise st.SessionDamaged(
        f"session {name!r} is sound at commit {current.commit}, but a rollback could not return to kept commit "
        f"{damaged_kept[0].commit or damaged_kept[0].manifest}: later commits retire it; fork the session to keep a "
        "sound copy"
    )
