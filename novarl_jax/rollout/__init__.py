"""Rollouts: tokenizers, verifiable-reward tasks and (soon) the KV-cache sampler."""
