"""Shared machinery of every stage: params, shards, engines, files, tracking, errors."""
