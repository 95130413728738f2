"""AutoResearch-RL's own shared package: event schemas, bus code, and the frozen research environment."""
