"""HTTP blueprints, one per resource: music, job, workers (operator), web (page + events)."""
