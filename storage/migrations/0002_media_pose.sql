-- What the pose stream did while the session's video stalled (actors/media_correlate.py,
-- pose_during_stalls): reps during stalls, paused during a stall, missed reps estimate.
-- NULL when the session had no genuine stall.
ALTER TABLE pose_session_metrics ADD COLUMN media_pose jsonb;
