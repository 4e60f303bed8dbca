//! The order waiting requests get workers in: fair between clients, by priority within one.

use std::collections::{HashMap, VecDeque};

use super::{Ticket, Waiter};

/// The waiters of one model in the order they get workers: round-robin between clients,
/// starting with the one served least recently (`served`: the number of each client's last
/// grant; then the one waiting longest); within a client, lower `priority` first, then
/// arrival. One client's burst thus never puts another client's request behind all of it.
pub(super) fn order(queue: &VecDeque<Waiter>, served: &HashMap<String, u64>) -> Vec<Waiter> {
    let mut per_client: Vec<(u64, Ticket, Vec<Waiter>)> = Vec::new();
    for w in queue {
        match per_client
            .iter_mut()
            .find(|(_, _, ws)| ws[0].who.client == w.who.client)
        {
            Some((_, _, ws)) => ws.push(w.clone()),
            None => {
                let last = served.get(&w.who.client).copied().unwrap_or(0);
                per_client.push((last, w.ticket, vec![w.clone()]));
            }
        }
    }
    per_client.sort_by_key(|(last, first, _)| (*last, *first));
    for (_, _, ws) in &mut per_client {
        ws.sort_by_key(|w| (w.who.priority, w.ticket));
    }
    let rounds = per_client
        .iter()
        .map(|(_, _, ws)| ws.len())
        .max()
        .unwrap_or(0);
    let mut out = Vec::with_capacity(queue.len());
    for i in 0..rounds {
        for (_, _, ws) in &per_client {
            if let Some(w) = ws.get(i) {
                out.push(w.clone());
            }
        }
    }
    out
}
