"""The ports of the domain: the storage interfaces, the work queue and the live event feed it
depends on, with the value types they carry. registry/ implements them (a Redis backend and an
in-memory twin each); the domain never imports registry/."""
