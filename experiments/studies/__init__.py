"""One module per experiment. Each defines `NAME`, `SCALES` ({"small": ..., "full": ...}, frozen
`harness.Scale` subclasses) and `run(ctx) -> dict`, and cites in its docstring what it reproduces."""
