def main() -> None:
    raise SystemExit("guardkit-server: not implemented yet")
