//! The ruleset installed over NETLINK_NETFILTER: one nf_tables batch that
//! adds and deletes the table (so it exists, then is gone) and declares it
//! whole again, the same transaction `install_script` describes to `nft -f`.

mod batch;
mod compile;
mod expr;
mod set;

use batch::{Batch, Cmd};

use crate::netlink::Socket;
use crate::netlink::msg::{NLM_F_APPEND, NLM_F_CREATE};
use crate::ruleset::{self, Hook, TABLE};
use crate::{Error, RedirectConfig};

// enum nft_table_attributes / nft_chain_attributes / nft_hook_attributes /
// nft_rule_attributes
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NF_ACCEPT: u32 = 1;
const NF_INET_PRE_ROUTING: u32 = 0;
const NF_INET_LOCAL_OUT: u32 = 3;

/// Replaces the table with the one for `cfg`, in one transaction.
pub(crate) fn install(sock: &mut Socket, cfg: &RedirectConfig) -> Result<(), Error> {
    let mut batch = Batch::new(sock);
    drop_table(&mut batch);
    add_table(&mut batch);
    let mut set_ids = 0;
    for chain in ruleset::chains(cfg) {
        batch.add(
            Cmd::NewChain,
            NLM_F_CREATE,
            format!("add chain {}", chain.name),
            |b| {
                b.put_str(NFTA_CHAIN_TABLE, TABLE);
                b.put_str(NFTA_CHAIN_NAME, chain.name);
                b.put_str(NFTA_CHAIN_TYPE, &chain.kind.to_string());
                b.put_be32(NFTA_CHAIN_POLICY, NF_ACCEPT);
                b.nest(NFTA_CHAIN_HOOK, |b| {
                    b.put_be32(NFTA_HOOK_HOOKNUM, hook_num(chain.hook));
                    b.put_be32(NFTA_HOOK_PRIORITY, chain.priority as u32);
                });
            },
        );
        for rule in &chain.rules {
            let compiled = compile::rule(rule, &mut set_ids);
            for set in &compiled.sets {
                batch.add(
                    Cmd::NewSet,
                    NLM_F_CREATE,
                    format!("add set for `{rule}`"),
                    |b| set.encode_set(b, TABLE),
                );
                for chunk in 0..set.element_chunks() {
                    batch.add(
                        Cmd::NewSetElem,
                        NLM_F_CREATE,
                        format!("add set elements for `{rule}`"),
                        |b| set.encode_elements(b, TABLE, chunk),
                    );
                }
            }
            batch.add(
                Cmd::NewRule,
                NLM_F_CREATE | NLM_F_APPEND,
                format!("add rule to chain {}: `{rule}`", chain.name),
                |b| {
                    b.put_str(NFTA_RULE_TABLE, TABLE);
                    b.put_str(NFTA_RULE_CHAIN, chain.name);
                    b.nest(NFTA_RULE_EXPRESSIONS, |b| {
                        for e in &compiled.exprs {
                            e.encode(b);
                        }
                    });
                },
            );
        }
    }
    batch.commit("installing the nftables ruleset")
}

/// Removes the table whether or not it exists.
pub(crate) fn remove(sock: &mut Socket) -> Result<(), Error> {
    let mut batch = Batch::new(sock);
    drop_table(&mut batch);
    batch.commit("removing the nftables ruleset")
}

/// Add-then-delete: the delete is always valid, and what was there is gone
/// (kernels before 6.3 have no NFT_MSG_DESTROYTABLE).
fn drop_table(batch: &mut Batch<'_>) {
    add_table(batch);
    batch.add(
        Cmd::DelTable,
        0,
        format!("delete table inet {TABLE}"),
        |b| b.put_str(NFTA_TABLE_NAME, TABLE),
    );
}

fn hook_num(hook: Hook) -> u32 {
    match hook {
        Hook::Prerouting => NF_INET_PRE_ROUTING,
        Hook::Output => NF_INET_LOCAL_OUT,
    }
}

fn add_table(batch: &mut Batch<'_>) {
    batch.add(
        Cmd::NewTable,
        NLM_F_CREATE,
        format!("add table inet {TABLE}"),
        |b| {
            b.put_str(NFTA_TABLE_NAME, TABLE);
            b.put_be32(NFTA_TABLE_FLAGS, 0);
        },
    );
}
