"""The stretches of an nvidia-smi sampling log (timestamp, SM clock, power draw, temperature; one sample every
100 ms) where the board drew more than a threshold, with the SM clock's minimum and median and the power's median
and maximum in each: which runs of a benchmark met the power limit and how far the clock fell.

    nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu --format=csv -lms 100 > clocks.csv &
    python3 benchmarks/results/h100-2026-12-05/scripts/clock_phases.py clocks.csv [--watts 250]
"""
import argparse
import csv
import statistics


def samples(path):
    """(time of day, SM MHz, watts, °C) for each well-formed row of the log."""
    with open(path) as log:
        for row in list(csv.reader(log))[1:]:
            try:
                yield row[0].strip()[11:], int(row[1].split()[0]), float(row[2].split()[0]), int(row[3])
            except (IndexError, ValueError):
                continue


def busy_stretches(rows, watts, min_samples=3):
    """Runs of consecutive samples drawing more than `watts`, at least `min_samples` long."""
    stretch = []
    for row in rows:
        if row[2] > watts:
            stretch.append(row)
            continue
        if len(stretch) >= min_samples:
            yield stretch
        stretch = []
    if len(stretch) >= min_samples:
        yield stretch


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("log")
    parser.add_argument("--watts", type=float, default=250.0)
    args = parser.parse_args()
    print("| from | samples | SM MHz min / median | W median / max | °C at end |\n|---|---:|---:|---:|---:|")
    for stretch in busy_stretches(samples(args.log), args.watts):
        clocks, power = [s[1] for s in stretch], [s[2] for s in stretch]
        print(f"| {stretch[0][0]} | {len(stretch)} | {min(clocks)} / {statistics.median(clocks):.0f} | "
              f"{statistics.median(power):.0f} / {max(power):.0f} | {stretch[-1][3]} |")


if __name__ == "__main__":
    main()
