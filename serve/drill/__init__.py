"""`slotserve drill`: rehearse an automatic rollback end to end and measure it (the
runbook is docs/drill.md). Nothing is imported here: the CLI loads `slotserve.drill.command`
without the drill's server."""
