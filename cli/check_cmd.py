"""`fastattn check`: verify a store end to end; `--repair` fixes what can be fixed."""

from __future__ import annotations

import click

from ._common import STORAGE_HELP, err, fail, repeatable, run, storage_options


@click.command()
@click.argument("store", help="The store (.zarr) written by fastattn ingest.")
@click.option(
    "--repair", is_flag=True,
    help="Fix what can be fixed without losing committed data: remove a stale lock and temporary files, "
    "restore array metadata the chunks on disk contradict, drop data past the last commit that no file "
    "claims, rebuild source/source_index and coordinates from the manifest, refresh the consolidated "
    "metadata, uncommit broken statistics and remove a broken rollout (both are recomputed). "
    "Takes the store's lock.",
)
@click.option(
    "--force", is_flag=True,
    help="With --repair: also drop committed batches that are damaged (a corrupt chunk, bad values), "
    "from the first damaged file onwards, and rewind the manifest; ingesting again restores them.",
)
@repeatable("--storage-option", help=STORAGE_HELP)
def check(store: str, repair: bool, force: bool, storage_option: list[str] | None) -> None:
    """Verify a store: metadata, shapes and chunks against the manifest, every chunk decodes, NaN
    exactly outside each valid block, rows summing to 1, the stats and rollout groups.

    Prints one line per problem (`where: what`) and a summary; exit code 1 while problems remain."""
    from fastattn import check as check_mod

    if force and not repair:
        fail("--force only works with --repair")
    options = storage_options(storage_option)
    result = run(lambda: check_mod.run_check(store, repair=repair, force=force, storage_options=options))
    for problem in result.problems:
        err.print(str(problem), markup=False, highlight=False)
    err.print(result.summary(), markup=False, highlight=False)
    raise click.exceptions.Exit(0 if result.ok else 1)


def register(app: click.Group) -> None:
    """Add `fastattn check` to the app."""
    app.add_command(check)
