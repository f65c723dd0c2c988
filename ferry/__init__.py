"""Ferry: live migration, and what builds on it, for plain QEMU/KVM hosts."""

__version__ = "0.1.0"
