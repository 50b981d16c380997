"""One module per experiment. Each defines `NAME`, `SCALES` ({"small": ..., "full": ...}, frozen
`harness.Scale` instances, subclassed for the study's own knobs), `run(ctx) -> dict`, optionally
`validate(scale)` (raising ValueError for settings it cannot run), and cites in its docstring what it
reproduces."""
