//! How fast a decode step will run for a split of the layers between the GPU (resident),
//! PCIe (streamed) and the host CPU (hybrid decoding), from measured rates: the streamer's
//! schedule replayed on paper. Copies run on the copy engine while the GPU or the CPU
//! computes; a streamed layer waits for its copy, a copy waits for its slot's previous reader
//! (engine::streamer, schedule points 1-3), and the host can issue copies ahead only up to the
//! next layer it computes itself, since it waits for the GPU there.

use super::{host_computed, PlanOptions};
use crate::checkpoint::inventory::Part;
use crate::checkpoint::ModelInfo;
use serde::{Deserialize, Serialize};

/// The share of device-memory bandwidth the decode kernels reach on a whole layer (H200,
/// RESULTS.md: 3.08 ms per token against a 1.66 ms weight-read floor).
pub const GPU_DECODE_EFFICIENCY: f64 = 0.55;

/// What a host-computed layer costs beyond its float8 products' weight reads at the rate
/// measured for them, ms: the hidden states' hand-over, norms, attention, the threads' start
/// and join for each product, and whatever makes the products slower inside a decode step
/// than measured alone. Fitted on the lent H200's host (RESULTS.md, commit 41f42c0: 0.9 ms
/// where the CPU alone bounds a step, more where it shares host memory with the copies);
/// other hosts may differ.
pub const HOST_LAYER_OVERHEAD_MS: f64 = 1.2;

/// Where a layer is computed, and from where its weights come.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Where {
    /// On the GPU from resident weights.
    Resident,
    /// On the GPU from weights copied over PCIe into a slot each use.
    Streamed,
    /// On the host CPU from host memory.
    Host,
}

/// Measured rates the prediction rests on.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    /// Host-to-device copies from pinned memory, GB/s.
    pub pinned_gbps: f64,
    /// Weight bytes per second the GPU's decode kernels read, GB/s.
    pub gpu_gbps: f64,
    /// Weight bytes per second the host CPU's float8 products read at this batch, GB/s.
    pub cpu_gbps: f64,
    /// What a host-computed layer costs beyond reading its weights: the hand-over of the
    /// hidden states both ways, norms, attention and the threads' start and join, ms.
    pub host_layer_overhead_ms: f64,
}

/// One decoder layer as the prediction sees it.
#[derive(Clone, Copy, Debug)]
pub struct Layer {
    /// Where it runs.
    pub place: Where,
    /// Weight bytes it reads (its packed copy, for a streamed layer).
    pub bytes: u64,
}

/// The layers of `model` as `options` and `gpu_layers` place them, in order.
pub fn layers(model: &ModelInfo, options: &PlanOptions, gpu_layers: usize) -> Vec<Layer> {
    let inventory = &model.inventory;
    let n = inventory.num_layers();
    let resident = options.placement.resident(n, gpu_layers);
    let host = host_computed(&resident, options.cpu_layers);
    (0..n)
        .map(|i| match (resident[i], host[i]) {
            (true, _) => Layer {
                place: Where::Resident,
                bytes: inventory.layer_bytes[i],
            },
            (false, true) => Layer {
                place: Where::Host,
                bytes: inventory.layer_bytes[i],
            },
            (false, false) => Layer {
                place: Where::Streamed,
                bytes: inventory.packed_layer_bytes[i],
            },
        })
        .collect()
}

/// Predicted ms per decode step of `model` with `gpu_layers` resident and `options`' split,
/// streaming slots and prefetch depth `depth`: the layers, and the LM head read once.
pub fn predict(
    model: &ModelInfo,
    options: &PlanOptions,
    gpu_layers: usize,
    depth: usize,
    rates: &Rates,
) -> f64 {
    let inventory = &model.inventory;
    let head = match model.config.tie_word_embeddings {
        true => Part::Embeddings,
        false => Part::LmHead,
    };
    let head_ms = inventory.part_bytes(head) as f64 / (rates.gpu_gbps * 1e6);
    let layers = layers(model, options, gpu_layers);
    ms_per_token(&layers, rates, options.stream_slots, depth, head_ms)
}

/// The `--cpu-layers` that [`predict`] finds fastest with `gpu_layers` resident (the fewest
/// among equals), with its prediction.
pub fn best_cpu_layers(
    model: &ModelInfo,
    options: &PlanOptions,
    gpu_layers: usize,
    depth: usize,
    rates: &Rates,
) -> (usize, f64) {
    let offloaded = model.inventory.num_layers().saturating_sub(gpu_layers);
    (0..=offloaded)
        .map(|c| {
            let o = PlanOptions {
                cpu_layers: c,
                ..options.clone()
            };
            (c, predict(model, &o, gpu_layers, depth, rates))
        })
        .fold((0, f64::INFINITY), |best, (c, ms)| match ms < best.1 {
            true => (c, ms),
            false => best,
        })
}

/// Decode tokens replayed before the one measured, so that the pipeline across tokens (the
/// next token's first copies during this token's last layers) is in its steady state.
const WARM_TOKENS: usize = 3;

/// Predicted milliseconds per decode step for `layers` in order, with `slots` streaming slots
/// and copies issued `depth` uses ahead (as `engine::EngineOptions` has them), plus
/// `other_ms` per step outside the layers (the LM head, reading the next token).
pub fn ms_per_token(
    layers: &[Layer],
    rates: &Rates,
    slots: usize,
    depth: usize,
    other_ms: f64,
) -> f64 {
    let ms = |bytes: u64, gbps: f64| bytes as f64 / (gbps * 1e6);
    let streamed: Vec<u64> = layers
        .iter()
        .filter(|l| l.place == Where::Streamed)
        .map(|l| l.bytes)
        .collect();
    let s = streamed.len();
    let slots = slots.max(1);
    let depth = depth.min(slots - 1);
    // With no more streamed layers than slots each keeps its slot: copied once, never again.
    let fixed = s <= slots;
    let mut chain = 0.0f64; // when the device (or the CPU, at a host layer) is done
    let mut host = 0.0f64; // how far the host has got issuing work
    let mut copy_free = 0.0f64;
    let mut copy_done: Vec<f64> = Vec::new();
    let mut compute_done: Vec<f64> = Vec::new();
    let mut issue = |v: usize, host: f64, compute_done: &[f64], copy_done: &mut Vec<f64>| {
        let slot_free = match v.checked_sub(slots) {
            Some(prev) => compute_done[prev],
            None => 0.0,
        };
        let start = copy_free.max(host).max(slot_free);
        copy_free = start + ms(streamed[v % s], rates.pinned_gbps);
        copy_done.push(copy_free);
    };
    let mut u = 0usize;
    let mut token_ends = Vec::new();
    for _ in 0..=WARM_TOKENS {
        for l in layers {
            match l.place {
                Where::Resident => chain += ms(l.bytes, rates.gpu_gbps),
                Where::Host => {
                    chain += rates.host_layer_overhead_ms + ms(l.bytes, rates.cpu_gbps);
                    host = chain;
                }
                Where::Streamed => {
                    let ready = match fixed {
                        true => {
                            if copy_done.len() <= u % s && u < s {
                                issue(u, host, &compute_done, &mut copy_done);
                            }
                            copy_done[u % s]
                        }
                        false => {
                            while copy_done.len() <= u + depth {
                                let v = copy_done.len();
                                issue(v, host, &compute_done, &mut copy_done);
                            }
                            copy_done[u]
                        }
                    };
                    chain = chain.max(ready) + ms(l.bytes, rates.gpu_gbps);
                    compute_done.push(chain);
                    // Released: the slot's next copy may be issued (schedule point 3).
                    if !fixed && depth > 0 {
                        while copy_done.len() <= u + 1 + depth {
                            let v = copy_done.len();
                            issue(v, host, &compute_done, &mut copy_done);
                        }
                    }
                    u += 1;
                }
            }
        }
        chain += other_ms;
        // The step's token is read back before the next step starts.
        host = chain;
        token_ends.push(chain);
    }
    token_ends[WARM_TOKENS] - token_ends[WARM_TOKENS - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATES: Rates = Rates {
        pinned_gbps: 50.0,
        gpu_gbps: 2000.0,
        cpu_gbps: 80.0,
        host_layer_overhead_ms: 0.1,
    };

    fn layers(places: &[Where]) -> Vec<Layer> {
        places
            .iter()
            .map(|&place| Layer {
                place,
                bytes: 200_000_000,
            })
            .collect()
    }

    #[test]
    fn the_best_split_of_a_7b_beats_streaming_alone_when_the_cpu_is_faster_than_pcie() {
        use crate::arch::config::BuiltinModel;
        use crate::checkpoint::CheckpointDtype;
        let m = ModelInfo::builtin(BuiltinModel::Large7b, CheckpointDtype::Float8);
        let o = PlanOptions::default();
        let streaming = predict(&m, &o, 8, 1, &RATES);
        let (c, best) = best_cpu_layers(&m, &o, 8, 1, &RATES);
        assert!(
            c > 0 && c < 20 && best < 0.6 * streaming,
            "{c}: {best} vs {streaming}"
        );
        // A CPU slower than the copies leaves everything to streaming.
        let slow = Rates {
            cpu_gbps: 5.0,
            ..RATES
        };
        assert_eq!(best_cpu_layers(&m, &o, 8, 1, &slow).0, 0);
        // Every layer resident: nothing to split.
        assert_eq!(best_cpu_layers(&m, &o, 28, 1, &RATES).0, 0);
    }

    #[test]
    fn streaming_alone_runs_at_the_copy_floor() {
        use Where::*;
        let l = layers(&[Streamed, Streamed, Streamed, Streamed, Resident, Resident]);
        let got = ms_per_token(&l, &RATES, 2, 1, 0.0);
        // Four 4 ms copies back to back; the resident layers hide under them.
        assert!((got - 16.0).abs() < 0.01, "{got}");
    }

    #[test]
    fn resident_and_host_layers_add_up() {
        use Where::*;
        let l = layers(&[Resident, Host, Resident, Host]);
        let got = ms_per_token(&l, &RATES, 2, 1, 0.5);
        let want = 2.0 * 0.1 + 2.0 * (0.1 + 2.5) + 0.5;
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
    }

    #[test]
    fn host_layers_between_streamed_ones_hide_the_copies() {
        use Where::*;
        // Each 4 ms copy runs while the CPU computes a 2.5 ms layer and the GPU the rest.
        let alternating = layers(&[Streamed, Host, Streamed, Host, Streamed, Host]);
        let got = ms_per_token(&alternating, &RATES, 2, 1, 0.0);
        let copies = 3.0 * 4.0;
        let cpu = 3.0 * 2.6;
        assert!(got < copies + cpu - 4.0, "overlapped: {got}");
        assert!(got >= copies.max(cpu), "{got}");
        // All the CPU layers first: the copy engine fills the slots, then waits.
        let grouped = layers(&[Host, Host, Host, Streamed, Streamed, Streamed]);
        assert!(ms_per_token(&grouped, &RATES, 2, 1, 0.0) > got);
        // Without prefetch nothing overlaps within a token.
        let serial = ms_per_token(&alternating, &RATES, 1, 0, 0.0);
        assert!(
            (serial - (copies + cpu + 3.0 * 0.1)).abs() < 1e-6,
            "{serial}"
        );
    }
}
