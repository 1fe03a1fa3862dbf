"""Labelled-case scoring shared by the guard tests: a precision/recall table in the test output,
and floors asserted per row."""


def assert_floors(rows, failures, min_precision: float, min_recall: float, label: str = "category") -> None:
    """rows: (name, positives, negatives, precision, recall); failures: what went wrong, for the message."""
    width = max(len(label), *(len(row[0]) for row in rows)) + 2
    print(f"\n{label:<{width}} pos  neg  precision  recall")
    for name, pos, neg, precision, recall in rows:
        print(f"{name:<{width}} {pos:>3}  {neg:>3}  {precision:>9.2f}  {recall:>6.2f}")
    print("\n".join(failures))
    for name, _, _, precision, recall in rows:
        assert precision >= min_precision, (name, precision, failures)
        assert recall >= min_recall, (name, recall, failures)
