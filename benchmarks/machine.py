"""What the benchmarks read about the machine they run on (Linux /proc), shared by the scripts here."""

from __future__ import annotations


def cpu_jiffies() -> tuple[int, int, int]:
    """(steal, idle including iowait, total) jiffies since boot, from the `cpu ` line of /proc/stat."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice]: guest time is already in user.
    return fields[7], fields[3] + fields[4], sum(fields[:8])


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" when it has none)."""
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"
