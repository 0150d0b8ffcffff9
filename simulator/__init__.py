"""The traffic simulator: drives the real greylisting core on a virtual clock."""
