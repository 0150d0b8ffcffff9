"""Front ends: thin shells that turn a protocol into a decision and back."""
