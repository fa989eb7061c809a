"""`medfed ledger` (being built)."""


def register(sub) -> None:
    sub.add_parser("ledger", help="(not built yet)")
