"""`make loadtest`: the production guide's load-testing plan against a real AuthPool server.

Modules: `schedule` (the plan and the open-loop arithmetic, pure),
`server` (the config, the server process, the /proc sampler), `seed`
(subscriptions near their budgets), `generator` (one load-generator
process), `report` (figures, markdown, plot), `__main__` (orchestration).
See docs/loadtest.md.
"""
