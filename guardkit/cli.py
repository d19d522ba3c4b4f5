def main() -> None:
    raise SystemExit("guardkit: not implemented yet")
