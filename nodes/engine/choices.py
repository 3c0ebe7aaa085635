"""The sampler and scheduler names the sampling nodes offer, importable without torch (node declarations load
at start-up, and `nodegraph nodes` or `validate` must not pay for importing torch)."""

SAMPLERS = ("euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2m", "dpmpp_2m_sde",
            "dpmpp_sde", "ddim", "uni_pc", "lcm")
SCHEDULERS = ("normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta")
