"""`medfed run` (being built)."""


def register(sub) -> None:
    sub.add_parser("run", help="(not built yet)")
