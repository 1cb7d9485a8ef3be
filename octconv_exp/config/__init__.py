"""The config: the dataclass schema and its validation, the resolvers that conf/ interpolates,
config groups and presets, unknown-key hints, and which ``_target_`` a saved config may name.
May import backends, records, models, data and errors.
"""
