from hypergen.engine.batching import call_key, group_compatible_jobs
from hypergen.protocol import GenerationJob


def job(request_id, n=1, size=(64, 64), steps=20, guidance=7.5, negative=None, prompt="p"):
    return GenerationJob(
        request_id=request_id,
        model="m",
        prompt=prompt,
        negative_prompt=negative,
        width=size[0],
        height=size[1],
        num_inference_steps=steps,
        guidance_scale=guidance,
        seeds=list(range(n)),
        admitted_at=0.0,
    )


def ids(jobs, call):
    return [jobs[index].request_id for index in call.job_indices]


def test_compatible_jobs_share_one_call_whatever_their_prompts_and_seeds():
    jobs = [job("a", prompt="cat"), job("b", n=2, prompt="dog", negative=None), job("c", prompt="x")]
    calls = group_compatible_jobs(jobs, max_images_per_call=8)
    assert len(calls) == 1
    assert calls[0].images == [(0, 0), (1, 0), (1, 1), (2, 0)]


def test_jobs_differing_in_call_wide_parameters_are_separated():
    jobs = [job("a"), job("b", size=(128, 64)), job("c", steps=4), job("d", guidance=3.0), job("e", negative="blur")]
    calls = group_compatible_jobs(jobs, max_images_per_call=8)
    assert [ids(jobs, call) for call in calls] == [["a"], ["b"], ["c"], ["d"], ["e"]]
    assert len({call_key(j) for j in jobs}) == 5


def test_edits_group_by_mode_and_strength_not_by_image():
    edit = lambda rid, strength, mode="image-to-image": job(rid).model_copy(  # noqa: E731
        update={"mode": mode, "strength": strength, "image_b64": rid}
    )
    jobs = [edit("a", 0.5), edit("b", 0.5), edit("c", 0.7), edit("d", 0.5, "inpainting"), job("e")]
    calls = group_compatible_jobs(jobs, max_images_per_call=8)
    assert [ids(jobs, call) for call in calls] == [["a", "b"], ["c"], ["d"], ["e"]]


def test_different_negative_prompts_can_share_a_call_but_not_with_none():
    jobs = [job("a", negative="blur"), job("b", negative="dark"), job("c")]
    calls = group_compatible_jobs(jobs, max_images_per_call=8)
    assert [ids(jobs, call) for call in calls] == [["a", "b"], ["c"]]


def test_groups_larger_than_the_max_batch_are_split_without_reordering():
    jobs = [job("a", n=3), job("b", n=4), job("c", n=2)]
    calls = group_compatible_jobs(jobs, max_images_per_call=4)
    assert [len(call.images) for call in calls] == [4, 4, 1]
    flat = [image for call in calls for image in call.images]
    assert flat == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1)]


def test_calls_run_in_fifo_order_of_their_oldest_job():
    jobs = [job("a", size=(128, 128)), job("b"), job("c", size=(128, 128)), job("d")]
    calls = group_compatible_jobs(jobs, max_images_per_call=8)
    assert [ids(jobs, call) for call in calls] == [["a", "c"], ["b", "d"]]


def test_max_batch_of_one_runs_every_image_alone():
    jobs = [job("a", n=2), job("b")]
    calls = group_compatible_jobs(jobs, max_images_per_call=1)
    assert [call.images for call in calls] == [[(0, 0)], [(0, 1)], [(1, 0)]]
