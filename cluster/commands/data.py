"""`medfed data` (being built)."""


def register(sub) -> None:
    sub.add_parser("data", help="(not built yet)")
