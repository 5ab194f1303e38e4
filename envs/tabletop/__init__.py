"""The MuJoCo tabletop scenes: MJCF builder, arm IK and the env (imports mujoco)."""
